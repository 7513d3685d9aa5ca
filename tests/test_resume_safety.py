"""Resuming runs nothing from a checkpoint, and a training log says what it cut.

A real run (`python -m qllava.training.train`, DeepSpeed engine, one process) saves a resumable checkpoint; each kind of file
in it (our RNG state, DeepSpeed's model and optimiser states) is then replaced by a pickle whose loading would run a
command. With the saved checksums the resume is refused before any file is read; with the checksums forged too, the
safe loader refuses the file. The command never runs. Projector `.bin` files and LoRA adapters are checked the same way.
"""
import json, os, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.timeout(900)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
DS_FILES = ["rng_rank0.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


class Payload:
    "Unpickling this runs `touch MARKER`."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))


def plant(path, marker):
    "Replace `path` by a pickle of the same kind of dict that runs a command when loaded."
    torch.save({"module": {"w": torch.zeros(2)}, "x": Payload(marker)}, path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    "A finetune run of 4 steps saving at step 2; one record is longer than model_max_length."
    d = tmp_path_factory.mktemp("resume")
    (d / "img").mkdir()
    rng = np.random.default_rng(0)
    recs = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(d / "img" / f"{i}.png")
        answer = ("word " * 200).strip() if i == 5 else ("Yes" if i % 2 else "No")
        recs.append({"id": "long" if i == 5 else f"q{i}", "image": f"{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\nIs it red?"}, {"from": "gpt", "value": answer}]})
    (d / "ft.json").write_text(json.dumps(recs))
    out = d / "out"
    args = ["--stage", "finetune", "--data_path", str(d / "ft.json"), "--image_folder", str(d / "img"), "--output_dir", str(out),
            "--model_max_length", "128", "--global_batch_size", "4", "--max_steps", "4", "--save_steps", "2", "--seed", "3"]
    r = subprocess.run([sys.executable, "-m", "qllava.training.train", *args], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return dict(dir=d, out=out, args=args, stdout=r.stdout)


def test_truncated_records_are_named_in_the_log_and_the_summary(run):
    s = json.loads((run["out"] / "summary.json").read_text())
    t = s["data"]["truncated"]
    assert t["count"] == 1 and t["first_records"] == [5] and t["first_ids"] == ["long"] and t["max_length"] == 128
    line = next(l for l in run["stdout"].splitlines() if "longer than max_length" in l)
    assert "1 of 12 records" in line and "5 (id 'long')" in line and "--model_max_length" in line


def _resume(run, ckpt, tmp_path):
    "Resume a copy of the run from `ckpt` (a copy of its checkpoint folder)."
    args = list(run["args"])
    args[args.index("--output_dir") + 1] = str(tmp_path / "out")
    return subprocess.run([sys.executable, "-m", "qllava.training.train", *args, "--resume_from_checkpoint", str(ckpt)],
                          env=ENV, capture_output=True, text=True)


@pytest.mark.parametrize("name", DS_FILES)
def test_a_planted_payload_in_a_resumable_checkpoint_runs_nothing(run, tmp_path, name):
    from qllava.training.resume import write_checksums
    ckpt = tmp_path / "step-2"
    shutil.copytree(run["out"] / "checkpoints" / "step-2", ckpt)
    assert (ckpt / name).is_file() and (ckpt / "checksums.json").is_file()
    marker = tmp_path / "PWNED"
    plant(ckpt / name, marker)
    # 1. the checksums saved with the checkpoint no longer hold: refused before the model is even built
    r = _resume(run, ckpt, tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "qllava train: error:" in r.stderr and f"{name} (size" in r.stderr and "nothing was loaded" in r.stderr
    assert "Traceback" not in r.stderr and not marker.exists()
    # 2. checksums forged to match: the loader itself refuses the pickle, naming the file and what it asked for
    write_checksums(ckpt)
    r = _resume(run, ckpt, tmp_path)
    assert r.returncode != 0 and not marker.exists(), "the planted command ran"
    assert f"{ckpt / name}: refused to load: it asks for posix.system" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    assert "resumed from" not in r.stdout


def test_a_checkpoint_without_checksums_or_with_an_extra_file_is_refused(run, tmp_path):
    ckpt = tmp_path / "step-2"
    shutil.copytree(run["out"] / "checkpoints" / "step-2", ckpt)
    (ckpt / "extra.pt").write_bytes(b"x")
    r = _resume(run, ckpt, tmp_path)
    assert r.returncode == 2 and "extra.pt (not saved with the checkpoint)" in r.stderr, r.stderr[-2000:]
    (ckpt / "checksums.json").unlink()
    r = _resume(run, ckpt, tmp_path)
    assert r.returncode == 2 and "no checksums.json" in r.stderr and "write_checksums" in r.stderr, r.stderr[-2000:]


def test_an_untouched_checkpoint_resumes(run, tmp_path):
    "The same checkpoint, unchanged, resumes (its checksums and the safe loader accept what DeepSpeed wrote) to the same weights."
    from safetensors.torch import load_file
    ckpt = tmp_path / "step-2"
    shutil.copytree(run["out"] / "checkpoints" / "step-2", ckpt)
    shutil.copy(run["out"] / "metrics.jsonl", tmp_path / "metrics.jsonl")
    (tmp_path / "out").mkdir()
    shutil.copy(run["out"] / "metrics.jsonl", tmp_path / "out" / "metrics.jsonl")   # a log that already holds steps 1-4
    r = _resume(run, ckpt, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resumed from" in r.stdout
    a, b = load_file(run["out"] / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(l)]
    assert steps == [1, 2, 3, 4], steps   # steps 3 and 4 were logged again after the resume, once each


def test_a_planted_payload_in_a_projector_or_lora_adapter_runs_nothing(tmp_path):
    from peft import LoraConfig, get_peft_model
    from qllava.core import CheckpointError
    from qllava.modeling.checkpoint import load_projector, save_projector
    from qllava.modeling.model import build_model
    from dataclasses import asdict
    from qllava.modeling.checkpoint import load_lora_run
    from qllava.config import TrainConfig, resolve_config
    marker = tmp_path / "PWNED"
    model, _ = build_model()
    (tmp_path / "proj").mkdir()
    torch.save({"model.mm_projector.0.weight": Payload(marker)}, tmp_path / "proj" / "mm_projector.bin")
    with pytest.raises(CheckpointError, match="refused to load"): load_projector(model, tmp_path / "proj" / "mm_projector.bin")
    assert not marker.exists()
    run = tmp_path / "lora-run"
    run.mkdir()
    save_projector(model, run)
    cfg = resolve_config(TrainConfig(stage="lora", model_name_or_path="preset:tiny-llama", vision_tower="preset:tiny-clip", data_path="x"))
    (run / "train_config.json").write_text(json.dumps(asdict(cfg)))   # as a run writes it
    get_peft_model(model.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).save_pretrained(run / "adapter", safe_serialization=False)
    assert (run / "adapter" / "adapter_model.bin").is_file()
    load_lora_run(run)   # the adapter as peft wrote it loads
    plant(run / "adapter" / "adapter_model.bin", marker)
    with pytest.raises(CheckpointError, match="refused to load the adapter"): load_lora_run(run)
    assert not marker.exists()
