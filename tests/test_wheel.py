"""What a `pip install` user gets: the built wheel, installed into a fresh venv, run from outside the repository.

The wheel is built from the repository's files (tracked and new, as a clean clone has them) and installed with
`--no-deps` into a new venv. First, with nothing else installed, every command whose optional dependency is missing
must say which extra to install, before any work. Then the dependencies are made visible from the project's own venv
(a .pth path entry: pip would otherwise download gigabytes), and from a scratch folder the commands run for real:
`qllava notebooks`, `qllava make-demo`, `qllava train` (stage 1 and 2 on the IMU demo), `qllava answer` and
`qllava sweep run` (one combination, executing the train notebook shipped inside the wheel). Nothing may be read from
the checkout: `qllava` is imported from the new venv and the checkout's nbs/ is never on a path.
"""
import json, os, shutil, subprocess, sys, sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(1500)
ROOT = Path(__file__).resolve().parent.parent


def files_of_a_clone(dst:Path):
    "Copy the repository's files (tracked and untracked-not-ignored: what a commit of this tree holds) into dst."
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for n in filter(None, names):
        src = ROOT / n
        if src.is_file():
            (dst / n).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(src, dst / n)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    "A fresh venv holding only the built wheel (no dependencies yet); returns (venv folder, its site-packages)."
    d = tmp_path_factory.mktemp("wheel")
    files_of_a_clone(d / "src")
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(d / "dist"), str(d / "src")],
                   check=True, capture_output=True)
    wheel, = (d / "dist").glob("qllava-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d / "venv")], check=True)
    py = d / "venv" / "bin" / "python"
    subprocess.run([*pip, "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (d / "work").mkdir()
    return d, site


def run(venv_dir:Path, *args, timeout=900, check=True):
    "A command of the new venv, in its scratch folder, with only the new venv's bin on PATH before the system's."
    d = venv_dir
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{d / 'venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    r = subprocess.run([str(d / "venv" / "bin" / args[0]), *map(str, args[1:])], cwd=d / "work", env=env,
                       capture_output=True, text=True, timeout=timeout)
    if check: assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def bare(venv):
    "The new venv before its dependencies are visible: what the missing-extra checks see."
    d, _ = venv
    out = {c: run(d, "qllava", c, "--help", check=False) for c in ("make-demo", "train", "demo")}
    return d, out


@pytest.fixture(scope="module")
def installed(bare, venv):
    "The new venv with the project venv's packages visible (after the bare checks)."
    d, site = venv
    (site / "zz_qllava_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return d


def test_a_missing_extra_is_named_before_any_work(bare):
    d, out = bare
    for cmd, extra in (("make-demo", "demo"), ("train", "train"), ("demo", "serve")):
        r = out[cmd]
        assert r.returncode == 2 and f"pip install 'qllava[{extra}]'" in r.stderr, (cmd, r.stderr)
        assert "Traceback" not in r.stderr
    assert not any((d / "work").iterdir())                    # nothing was written


def test_qllava_comes_from_the_wheel_with_its_run_notebooks(installed):
    d = installed
    r = run(d, "python", "-c", "import qllava, qllava.core as c; print(qllava.__file__); print(c.run_notebook('train.ipynb'))")
    mod, nb = r.stdout.split()
    assert mod.startswith(str(d / "venv")) and nb.startswith(str(d / "venv")) and "notebooks" in nb
    run(d, "qllava", "notebooks", "nbs")
    for n in ("train.ipynb", "eval.ipynb", "sweep.ipynb"):
        assert (d / "work" / "nbs" / n).read_bytes() == (ROOT / "nbs" / n).read_bytes()


def test_make_demo_rebuilds_the_demo_outside_the_repository(installed):
    d = installed
    run(d, "qllava", "make-demo", "--out", "assets")
    assert (d / "work" / "assets" / "tokenizers" / "llama-demo" / "tokenizer.json").is_file()
    assert (d / "work" / "assets" / "demo" / "imu" / "finetune.json").is_file()


@pytest.fixture(scope="module")
def trained(installed):
    "Stage 1 and stage 2 on the IMU demo with `qllava train` (one process each, a few steps)."
    d = installed
    paths = json.loads(run(d, "python", "-c", "import json; from qllava.data.presets import demo_paths; "
                                             "print(json.dumps({k: str(v) for k, v in demo_paths('imu').items()}))").stdout)
    common = ["--model_name_or_path", "preset:tiny-llama", "--vision_tower", "preset:tiny-limu",
              "--image_folder", paths["media_folder"], "--global_batch_size", "8", "--model_max_length", "256"]
    outs = [run(d, "qllava", "train", "--stage", "pretrain", "--data_path", paths["pretrain"], "--output_dir", "pre",
                "--max_steps", "3", "--learning_rate", "1e-3", *common),
            run(d, "qllava", "train", "--stage", "finetune", "--data_path", paths["finetune"], "--output_dir", "ft",
                "--pretrain_mm_mlp_adapter", "pre/mm_projector.bin", "--max_steps", "2", "--learning_rate", "1e-4", *common)]
    return d, paths, outs


def test_train_terminal_shows_our_lines_and_the_libraries_go_to_the_log(trained):
    d, _, outs = trained
    for r in outs:
        shown = r.stdout + r.stderr
        for noise in ("Warning", "WARNING", "built successfully", "Failed to load", "accelerator", "CUDA_HOME"):
            assert noise not in shown, (noise, shown[-2000:])
        assert "stage " in shown and "optimiser steps" in shown           # our own lines stay
    log = (d / "work" / "pre" / "third_party.log").read_text()
    assert "built successfully" in log                                    # DeepSpeed's op line, kept in the log


def test_train_and_answer_from_the_wheel(trained):
    d, paths, _ = trained
    assert json.loads((d / "work" / "ft" / "summary.json").read_text())["steps"] == 2
    run(d, "qllava", "answer", "--model-path", "ft", "--question-file", paths["eval_questions"], "--image-folder",
        paths["media_folder"], "--answers-file", "answers.jsonl", "--max_new_tokens", "4")
    answers = [json.loads(l) for l in (d / "work" / "answers.jsonl").read_text().splitlines()]
    n = len((Path(paths["eval_questions"])).read_text().splitlines())
    assert len(answers) == n and all("text" in a for a in answers)


def test_sweep_run_executes_the_shipped_train_notebook(trained):
    d, _, _ = trained
    params = {"modality": ["sensor"], "num_train_epochs": [1.0], "learning_rate": [1e-3], "stage": ["finetune"],
              "pretrain_mm_mlp_adapter": str(d / "work" / "pre" / "mm_projector.bin"), "runs_dir": "sweeps",
              "metric": "open_accuracy", "sweep_name": "one",
              "train_parameters": {"blank_media_control": False, "num_gpus": 1}}
    (d / "work" / "sweep.json").write_text(json.dumps(params))
    run(d, "qllava", "sweep", "run", "sweep.json")
    rec = json.loads((d / "work" / "sweeps" / "one" / "sweep.json").read_text())
    assert [r["status"] for r in rec["runs"]] == ["finished"]
    executed = json.loads(next((d / "work" / "sweeps" / "one").glob("*/train.ipynb")).read_text())
    assert str(ROOT) not in json.dumps(executed)               # nothing of the checkout in the run
