"""Each run notebook's papermill `parameters` cell declares exactly the parameters the library defines for it. The train
notebook's cell is the text `qllava.workflows.runs.parameters_cell` writes from `TrainConfig` and `RunOptions` (one
definition of the names, types and defaults); nbs/eval.ipynb and nbs/sweep.ipynb declare exactly the parameters of their
tables in the library (`qllava.workflows.runs.TRAIN_PARAMETERS`, `qllava.workflows.evalrun.EVAL_PARAMETERS`,
`qllava.workflows.sweep.SWEEP_PARAMETERS`): the same names in the same order, the same defaults, and annotations naming the type of
each default, the type `qllava.core.check_types` holds a given value to. The notebook passes only the table's names on
(`{k: globals()[k] for k in TABLE}`) and the library fills omitted ones from the table, so a drift between the two would
make the notebook and the library disagree about a default."""
import ast, json
from pathlib import Path

import pytest

from qllava.workflows.runs import TRAIN_PARAMETERS, parameters_cell as train_parameters_cell
from qllava.workflows.evalrun import EVAL_PARAMETERS
from qllava.workflows.sweep import SWEEP_PARAMETERS

NBS = Path(__file__).resolve().parents[1] / "nbs"
CASES = {"eval": EVAL_PARAMETERS, "sweep": SWEEP_PARAMETERS}


def parameters_source(name:str) -> str:
    "The source of the notebook's one cell tagged `parameters`."
    nb = json.loads((NBS / f"{name}.ipynb").read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{name}.ipynb: {len(cells)} cells tagged parameters, want 1"
    return "".join(cells[0]["source"])


def test_the_train_notebooks_parameters_cell_is_written_from_the_config():
    assert parameters_source("train") == train_parameters_cell(), (
        "nbs/train.ipynb's parameters cell differs from runs.parameters_cell(): paste its output into the cell")
    names = [node.target.id for node in ast.parse(parameters_source("train")).body]
    assert names == list(TRAIN_PARAMETERS)


def parameters_cell(name:str) -> list[tuple[str, str, object]]:
    "(name, annotated type, default) of each assignment in the notebook's cell tagged `parameters`, in order."
    out = []
    for node in ast.parse(parameters_source(name)).body:
        assert isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(node.annotation, ast.Name), \
            f"{name}.ipynb: every statement of the parameters cell is `name: type = literal`, not {ast.unparse(node)!r}"
        out.append((node.target.id, node.annotation.id, ast.literal_eval(node.value)))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_parameters_cell_equals_its_table(name):
    table, cell = CASES[name], parameters_cell(name)
    assert [n for n, _, _ in cell] == list(table), f"{name}.ipynb: names differ from the table"
    for n, annotation, default in cell:
        want = table[n]
        assert repr(default) == repr(want), f"{name}.ipynb: {n} = {default!r}, the table says {want!r}"  # repr: 0 is not 0.0, [0] not [0.0]
        assert annotation == type(want).__name__, f"{name}.ipynb: {n}: {annotation}, the table's default is a {type(want).__name__}"
