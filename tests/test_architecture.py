"""The package's shape: every internal import at module level (so a module's header shows its dependencies) and pointing
to a lower layer of `qllava.core.LAYERS` (hence no cycle), no class patched by assignment, no function over 60 lines."""
import ast, graphlib
from pathlib import Path
import qllava
from qllava.core import LAYERS, layer_of

PKG = Path(qllava.__file__).parent
MODULES = sorted(p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_"))

def internal_imports(module:str) -> list[tuple[str, int, bool]]:
    "(imported module, line, at module level) for every import of another qllava module in `module`."
    tree = ast.parse((PKG / f"{module}.py").read_text())
    top = {id(n) for n in tree.body}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module: names = [n.module.split(".")[0]]
        elif isinstance(n, ast.ImportFrom) and n.level == 1: names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("qllava."): names = [n.module.split(".")[1]]
        elif isinstance(n, ast.Import): names = [a.name.split(".")[1] for a in n.names if a.name.startswith("qllava.")]
        else: continue
        out += [(m, n.lineno, id(n) in top) for m in names]
    return out

def test_every_module_has_a_layer():
    assert sorted(m for mods in LAYERS.values() for m in mods) == MODULES

def test_internal_imports_are_at_module_level():
    "`import qllava` (the package, for its version or path) is the one import a function may make."
    inner = [f"{m}.py:{line} imports {t}" for m in MODULES for t, line, top in internal_imports(m) if not top]
    assert not inner, "\n".join(inner)

def test_internal_imports_are_in_the_header():
    "Before the module's first function or class: reading the top of a file tells what it depends on."
    late = []
    for m in MODULES:
        body = ast.parse((PKG / f"{m}.py").read_text()).body
        first = next((n.lineno for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))), 10**9)
        late += [f"{m}.py:{t_line}: imports {t} after its first definition (line {first})"
                 for t, t_line, top in internal_imports(m) if top and t_line > first]
    assert not late, "\n".join(late)

def test_imports_point_down_the_layers():
    up = [f"{m}.py:{line}: {m} ({list(LAYERS)[layer_of(m)]}) imports {t} ({list(LAYERS)[layer_of(t)]})"
          for m in MODULES for t, line, _ in internal_imports(m) if layer_of(t) >= layer_of(m)]
    assert not up, "\n".join(up)

def test_no_import_cycle():
    graph = {m: {t for t, _, _ in internal_imports(m)} - {m} for m in MODULES}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle

def test_no_class_is_patched_by_assignment():
    "Methods live in the class body or come with fastcore's `@patch` (which says where they belong), never `Cls.attr = f`."
    found = []
    for m in MODULES:
        for n in ast.parse((PKG / f"{m}.py").read_text()).body:
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, (ast.AnnAssign, ast.AugAssign)) else []
            for t in targets:
                for e in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id[:1].isupper():
                        found.append(f"{m}.py:{n.lineno}: {e.value.id}.{e.attr} = ...")
    assert not found, "\n".join(found)

def test_no_function_is_over_60_lines():
    "Long procedures are split into named steps, each findable by its name."
    long = [f"{m}.py:{n.lineno} {n.name}: {n.end_lineno - n.lineno + 1} lines" for m in MODULES
            for n in ast.walk(ast.parse((PKG / f"{m}.py").read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, "\n".join(long)

# Where the names of the shipped modalities may be written (issue 22): their registrations, and code that is about
# them by nature. Everywhere else a modality is whatever the registry says, so a modality registered in a notebook
# goes through validation, conversion, training and answering like these two.
SHIPPED_MODALITY_NAMES = {"image", "sensor"}
MAY_NAME_THEM = {
    "modality": "the registrations themselves",
    "media": "each processor declares the modality it reads",
    "encoders": "each encoder kind registers the modality of its features",
    "presets": "the shipped demo data sets, one per shipped modality",
    "demo": "builds the shipped demo data",
    "benchmarks": "the published pathology and wearable benchmarks",
    "checkpoint": "original LLaVA checkpoints (import, export) are image models",
    "webdemo": "the upload widget of each shipped modality",
    "runs": "the train notebook's demo default and the IMU demo's epochs",
    "evalrun": "the eval notebook's demo default",
    "sweep": "the sweep notebook's demo default",
    "convert.windows_from_recordings": "cuts IMU recordings into sensor windows",
}

def test_library_names_no_shipped_modality_outside_its_registrations():
    "No string 'image' / 'sensor' in the library outside `MAY_NAME_THEM`: layers ask the modality registry instead."
    found = []
    for m in MODULES:
        if m in MAY_NAME_THEM: continue
        tree = ast.parse((PKG / f"{m}.py").read_text())
        for top in tree.body:
            where = f"{m}.{getattr(top, 'name', '')}"
            if where in MAY_NAME_THEM: continue
            found += [f"{m}.py:{n.lineno} {n.value!r}" for n in ast.walk(top)
                      if isinstance(n, ast.Constant) and n.value in SHIPPED_MODALITY_NAMES]
    assert not found, "\n".join(found)


def test_the_ignored_label_is_named_not_written():
    "-100 is written once, as `qllava.tokenize.IGNORE_INDEX`; every other use names it."
    lines = {m: (PKG / f"{m}.py").read_text().splitlines() for m in MODULES}
    found = [f"{m}.py:{n.lineno}: {lines[m][n.lineno - 1].strip()}" for m in MODULES for n in ast.walk(ast.parse("\n".join(lines[m])))
             if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub) and isinstance(n.operand, ast.Constant)
             and n.operand.value == 100]
    assert len(found) == 1 and found[0].startswith("tokenize.py:") and ": IGNORE_INDEX = -100" in found[0], found
