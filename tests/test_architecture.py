"""The package's shape: folders that are layers (a package imports only from itself and the packages below it), every
internal import at module level (so a module's header shows its dependencies) and pointing to a lower layer of
`qllava.core.LAYERS` (hence no cycle), no class patched by assignment, no function over 50 lines, no line over 120
columns."""
import ast, graphlib, subprocess, sys
from pathlib import Path
import qllava
from qllava.core import LAYERS, layer_of

PKG = Path(qllava.__file__).parent
# every module as its path below qllava: "core", "training.train", ...
MODULES = sorted(".".join(p.relative_to(PKG).with_suffix("").parts) for p in PKG.rglob("*.py")
                 if not p.name.startswith("_"))

def source(module:str) -> str: return (PKG / (module.replace(".", "/") + ".py")).read_text()
def file_of(module:str) -> str: return module.replace(".", "/") + ".py"
def package_of(module:str) -> str: return module.rpartition(".")[0]

def _resolve(module:str, n) -> list[str]:
    "The qllava modules (paths below qllava) an import node names."
    if isinstance(n, ast.Import): return [a.name[len("qllava."):] for a in n.names if a.name.startswith("qllava.")]
    if n.level:
        base = module.split(".")[:-n.level]
        names = [".".join(base + n.module.split("."))] if n.module else [".".join(base + [a.name]) for a in n.names]
    elif (n.module or "").startswith("qllava."): names = [n.module[len("qllava."):]]
    else: return []
    return [m for m in names if m]

def internal_imports(module:str) -> list[tuple[str, int, bool]]:
    "(imported module, line, at module level) for every import of another qllava module in `module`."
    tree = ast.parse(source(module))
    top = {id(n) for n in tree.body}
    return [(m, n.lineno, id(n) in top) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
            for m in _resolve(module, n)]

def test_every_module_has_a_layer():
    assert sorted(m for mods in LAYERS.values() for m in mods) == MODULES

def test_the_folders_are_the_layers():
    "`ls qllava/` shows the layers: each package's modules fill consecutive layers, and no package comes back later."
    order = [package_of(m) for mods in LAYERS.values() for m in mods]
    runs = [p for i, p in enumerate(order) if i == 0 or p != order[i - 1]]
    assert len([p for p in runs if p]) == len({p for p in runs if p}), runs
    assert {package_of(m) for m in MODULES} - {""} == {p.name for p in PKG.iterdir() if p.is_dir()
                                                       and p.name != "assets"
                                                       and not p.name.startswith("_")}

def test_packages_import_only_downward():
    "A module imports only from its own package or a package whose layers come before its own."
    first = {}
    for i, mods in enumerate(LAYERS.values()):
        for m in mods: first.setdefault(package_of(m) or m, i)
    up = [f"{file_of(m)}:{line}: {package_of(m) or m} imports {t} ({package_of(t) or t})" for m in MODULES
          for t, line, _ in internal_imports(m)
          if package_of(t) != package_of(m) and first[package_of(t) or t] > first[package_of(m) or m]]
    assert not up, "\n".join(up)

def test_the_model_saves_and_loads_whatever_was_imported_first(tmp_path):
    ("`save_pretrained` / `from_pretrained` are the model class's own methods (issue 22): a script that imports only "
     "`qllava.modeling.model` saves and reads a checkpoint, and nothing is patched onto the class from outside.")
    code = ("import sys; from qllava.modeling.model import QllavaForCausalLM, build_model\n"
            "m, t = build_model(seed=1); m.save_pretrained(sys.argv[1], tokenizer=t)\n"
            "n = QllavaForCausalLM.from_pretrained(sys.argv[1])\n"
            "assert all((a == b).all() for a, b in zip(m.state_dict().values(), n.state_dict().values()))\n"
            "print('RESULT', 'save_pretrained' in vars(QllavaForCausalLM), 'from_pretrained' in vars(QllavaForCausalLM))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt")], capture_output=True, text=True,
                       timeout=300)
    result = [l.split()[1:] for l in r.stdout.splitlines() if l.startswith("RESULT")]
    assert r.returncode == 0 and result == [["True", "True"]], r.stderr[-2000:]
    assert "@patch" not in source("modeling.checkpoint")

def test_the_flat_layout_names_still_import():
    "`qllava.train`, `from qllava.model import ...` and `python -m qllava.train` (before the folders) still work."
    import importlib
    for m in MODULES:
        short = m.rpartition(".")[2]
        assert importlib.import_module(f"qllava.{short}") is importlib.import_module(f"qllava.{m}"), m
    from qllava.model import build_model
    from qllava.modeling.model import build_model as b2
    assert build_model is b2
    for name in ("qllava.train", "qllava.answer", "qllava.sweep"):
        r = subprocess.run([sys.executable, "-m", name, "--help"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "usage:" in r.stdout, (name, r.stdout[-500:], r.stderr[-2000:])

def test_internal_imports_are_at_module_level():
    "`import qllava` (the package, for its version or path) is the one import a function may make."
    inner = [f"{file_of(m)}:{line} imports {t}" for m in MODULES for t, line, top in internal_imports(m) if not top]
    assert not inner, "\n".join(inner)

def test_internal_imports_are_in_the_header():
    "Before the module's first function or class: reading the top of a file tells what it depends on."
    late = []
    for m in MODULES:
        body = ast.parse(source(m)).body
        first = next((n.lineno for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))),
                     10**9)
        late += [f"{file_of(m)}:{t_line}: imports {t} after its first definition (line {first})"
                 for t, t_line, top in internal_imports(m) if top and t_line > first]
    assert not late, "\n".join(late)

def test_imports_point_down_the_layers():
    up = [f"{file_of(m)}:{line}: {m} ({list(LAYERS)[layer_of(m)]}) imports {t} ({list(LAYERS)[layer_of(t)]})"
          for m in MODULES for t, line, _ in internal_imports(m) if layer_of(t) >= layer_of(m)]
    assert not up, "\n".join(up)

def test_no_import_cycle():
    graph = {m: {t for t, _, _ in internal_imports(m)} - {m} for m in MODULES}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle

def test_no_class_is_patched_by_assignment():
    ("Methods live in the class body or come with fastcore's `@patch` (which says where they belong), never `Cls.attr "
     "= f`.")
    found = []
    for m in MODULES:
        for n in ast.parse(source(m)).body:
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, (ast.AnnAssign,
                                                                                               ast.AugAssign)) else []
            for t in targets:
                for e in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id[:1].isupper():
                        found.append(f"{file_of(m)}:{n.lineno}: {e.value.id}.{e.attr} = ...")
    assert not found, "\n".join(found)

def test_no_function_is_over_50_lines():
    "Long procedures are split into named steps, each findable by its name (lines within 120 columns make it count)."
    long = [f"{file_of(m)}:{n.lineno} {n.name}: {n.end_lineno - n.lineno + 1} lines" for m in MODULES
            for n in ast.walk(ast.parse(source(m)))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 50]
    assert not long, "\n".join(long)

LIBRARY_NOTEBOOKS = sorted(Path(__file__).parents[1].glob("nbs/[0-9]*.ipynb"))
WIDTH = 120

def test_no_line_is_wider_than_120_columns():
    """Every line of the library's code cells (the source) and of its modules, but for what nbdev writes itself: a
    module's first line (its docstring, the notebook's description) and its `__all__` list."""
    import json
    wide = [f"{nb.name} cell {i}: {len(l)} columns: {l.strip()[:60]}" for nb in LIBRARY_NOTEBOOKS
            for i, c in enumerate(json.loads(nb.read_text())["cells"]) if c["cell_type"] == "code"
            for l in "".join(c["source"]).splitlines() if len(l) > WIDTH]
    for m in MODULES:
        tree = ast.parse(source(m))
        generated = {1} | {n for a in tree.body if isinstance(a, ast.Assign) and getattr(a.targets[0], "id",
                                                                                         "") == "__all__"
                           for n in range(a.lineno, a.end_lineno + 1)}
        wide += [f"{file_of(m)}:{i}: {len(l)} columns" for i, l in enumerate(source(m).splitlines(), 1)
                 if len(l) > WIDTH and i not in generated]
    assert LIBRARY_NOTEBOOKS and not wide, "\n".join(wide)

def test_one_function_or_class_per_export_cell():
    "Each export cell of a library notebook defines at most one function or class, so prose and examples sit between."
    import json
    crowded = []
    for nb in LIBRARY_NOTEBOOKS:
        for i, c in enumerate(json.loads(nb.read_text())["cells"]):
            src = "".join(c["source"])
            if c["cell_type"] != "code" or not src.startswith("#| export"): continue
            defs = [n.name for n in ast.parse(src).body
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
            if len(defs) > 1: crowded.append(f"{nb.name} cell {i}: {', '.join(defs)}")
    assert not crowded, "\n".join(crowded)

# Public functions that still take more than 8 parameters (issue 22, item 5: to be grouped into small config
# dataclasses, as TrainConfig and LaunchSpec group theirs). The list may only shrink: a new function keeps within 8.
# signatures that follow a library's calling convention rather than group settings of ours, with the reason
CALLING_CONVENTIONS = {"modeling.model.QllavaForCausalLM.forward":
                       "transformers' generate(), loss and Trainer code call forward with these keywords"}

def test_public_functions_take_at_most_8_parameters():
    "More than 8 parameters means a group of settings that belongs in a config object (`self` not counted)."
    found = set()
    for m in MODULES:
        for top in ast.parse(source(m)).body:
            fn = (ast.FunctionDef, ast.AsyncFunctionDef)
            if isinstance(top, fn): fns = [(top.name, top)]
            elif isinstance(top, ast.ClassDef) and not top.name.startswith("_"):
                fns = [(f"{top.name}.{f.name}", f) for f in top.body if isinstance(f, fn)]
            else: fns = []
            for name, f in fns:
                a = f.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - (1 if "." in name else 0)
                if n > 8 and not name.split(".")[-1].startswith("_"): found.add(f"{m}.{name}")
    assert found <= set(CALLING_CONVENTIONS), (f"functions with more than 8 parameters: {sorted(found - set(CALLING_CONVENTIONS))}"
                                               ": group them in a small dataclass")
    assert found == set(CALLING_CONVENTIONS), f"no longer needed: drop {sorted(set(CALLING_CONVENTIONS) - found)}"

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
        short = m.rpartition(".")[2]
        if short in MAY_NAME_THEM: continue
        tree = ast.parse(source(m))
        for top in tree.body:
            where = f"{short}.{getattr(top, 'name', '')}"
            if where in MAY_NAME_THEM: continue
            found += [f"{file_of(m)}:{n.lineno} {n.value!r}" for n in ast.walk(top)
                      if isinstance(n, ast.Constant) and n.value in SHIPPED_MODALITY_NAMES]
    assert not found, "\n".join(found)


def test_the_ignored_label_is_named_not_written():
    "-100 is written once, as `qllava.data.tokenize.IGNORE_INDEX`; every other use names it."
    lines = {m: source(m).splitlines() for m in MODULES}
    found = [f"{file_of(m)}:{n.lineno}: {lines[m][n.lineno - 1].strip()}" for m in MODULES
             for n in ast.walk(ast.parse("\n".join(lines[m])))
             if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub) and isinstance(n.operand, ast.Constant)
             and n.operand.value == 100]
    assert len(found) == 1 and found[0].startswith("data/tokenize.py:") and ": IGNORE_INDEX = -100" in found[0], found
