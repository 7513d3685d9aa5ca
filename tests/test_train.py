"""Training end to end through the real launchers (DeepSpeed on 2 CPU ranks over gloo, torchrun on loopback).

Each test launches `python -m qllava.training.train` as a user would; nothing is mocked.
"""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from qllava.cluster.launch import LaunchSpec, launch
from qllava.core import LaunchError

pytestmark = pytest.mark.timeout(900)
N_RECORDS = 36
# three phrasings: samples of different lengths, so packed rows compute fewer tokens than one sample per row
QUESTIONS = ["Is the tile red?", "Is the tile red? Answer yes or no.", "Look at the tile closely. Is its colour red?"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "A tiny image data set: red tiles answer Yes, blue tiles No; captions for stage 1; one text-only record."
    d = tmp_path_factory.mktemp("data")
    (d / "img").mkdir()
    rng = np.random.default_rng(0)
    ft, pt = [], []
    for i in range(N_RECORDS):
        red = i % 2 == 0
        a = rng.integers(0, 40, (40, 56, 3), dtype=np.uint8)
        a[..., 0 if red else 2] += 180
        Image.fromarray(a).save(d / "img" / f"{i}.png")
        ft.append({"id": f"q{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + QUESTIONS[i % 3]}, {"from": "gpt", "value": "Yes" if red else "No"}]})
        pt.append({"id": f"c{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the tile."}, {"from": "gpt", "value": "A red tile." if red else "A blue tile."}]})
    ft.append({"id": "text", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there."}]})
    (d / "ft.json").write_text(json.dumps(ft))
    (d / "pt.json").write_text(json.dumps(pt))
    return d


def flags(data, out, stage="finetune", **kw):
    base = {"stage": stage, "data_path": data / ("pt.json" if stage == "pretrain" else "ft.json"),
            "image_folder": data / "img", "output_dir": out, "model_max_length": 128, "global_batch_size": 8,
            "num_train_epochs": 2, "learning_rate": 1e-3, "seed": 3}
    base.update(kw)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def ds_launch(args, run_dir, ranks=2, **kw):
    return launch(["-m", "qllava.training.train", *args], run_dir, spec=LaunchSpec(launcher="deepspeed", gpus_per_node=0, cpu_ranks=ranks),
                  hang_timeout=600, echo=False, **kw)


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def projector(data, tmp_path_factory):
    "A stage-1 run (1 process, no launcher): only the projector may change."
    out = tmp_path_factory.mktemp("pretrain")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    subprocess.run([sys.executable, "-m", "qllava.training.train", *flags(data, out, "pretrain", save_steps=2, save_total_limit=1, gradient_checkpointing=True,
                                                                report_to="tensorboard,wandb")],
                   check=True, env=env, capture_output=True, text=True)
    return out


def test_report_to_tensorboard_and_wandb_get_the_same_losses(projector):
    "--report_to (the original scripts pass wandb): every logged loss reaches tensorboard and an offline wandb run."
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(next((projector / "tensorboard").glob("events.out.tfevents.*")))); ev.Reload()
    tb = [round(e.value, 4) for e in ev.Scalars("train/loss")]
    assert tb and tb == [round(x, 4) for x in losses(projector)]
    runs = list((projector / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_stage1_changes_only_the_projector(projector):
    from qllava.modeling.model import build_model
    ref, _ = build_model(seed=3)  # the run's base: same presets, same seed
    ck = sorted((projector / "checkpoints").glob("step-*"))[-1]
    from qllava.training.resume import safe_load
    states = safe_load(next(ck.glob("mp_rank_00_model_states.pt")))["module"]   # trained with gradient checkpointing: gradients reach it
    before = ref.state_dict()
    changed = {k for k, v in states.items() if not torch.equal(v.float(), before[k].float())}
    assert changed and all(k.startswith("projectors.") for k in changed), sorted(changed)[:5]
    assert {k for k in before if k.startswith("projectors.")} <= changed
    assert (projector / "mm_projector.bin").exists() and (projector / "mm_projector.safetensors").exists()
    orig = torch.load(projector / "mm_projector.bin", weights_only=True)
    assert set(orig) == {"model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight", "model.mm_projector.2.bias"}


@pytest.fixture(scope="module")
def one_process(data, projector, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    ds_launch(flags(data, out, pretrain_mm_mlp_adapter=projector / "mm_projector.bin", per_device_train_batch_size=8), out, ranks=1)
    return out


PACKED = dict(packing=True, packing_max_tokens=128)  # rows of up to 128 tokens: several samples each


@pytest.mark.parametrize("zero,packing", [("zero2", False), ("zero3", False), ("zero3", True)])
def test_two_ranks_shard_the_data_and_follow_the_single_process_curve(data, projector, one_process, tmp_path, zero, packing):
    out = tmp_path / zero
    ds_launch(flags(data, out, pretrain_mm_mlp_adapter=projector / "mm_projector.bin", deepspeed=zero,
                    log_sample_ids=True, per_device_train_batch_size=4, **(PACKED if packing else {})), out)
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["mfu"] < 1 and summary["model_flops_per_s"] > 0 and summary["tokens_per_s"] > 0
    if packing:  # the same samples per step in fewer rows: the packed curve is the unpacked one
        assert summary["rows_per_sample"] < 0.6 and summary["padding_share"] < 0.05
    assert summary["world_size"] == 2
    # the CPU world_size trap: each rank must read its own shard, and together every record once per epoch
    seen = {r: [json.loads(l) for l in (out / "sample_ids" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    for epoch in (0, 1):
        per_rank = [[i for rec in seen[r] if rec["epoch"] == epoch for i in rec["records"]] for r in (0, 1)]
        assert per_rank[0] and per_rank[1] and not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(N_RECORDS + 1))
    # same global batch (8), same samples per step, loss = mean over every supervised token of the global batch:
    # the 2-rank curve equals the 1-process curve up to float summation order (stated tolerance: 0.2 % per step)
    a, b = losses(one_process), losses(out)
    assert len(a) == len(b) == summary["steps"]
    np.testing.assert_allclose(b, a, rtol=2e-3)
    assert b[-1] < b[0]
    # fp32 weights: the optimiser's master is each rank's share of the weights, not a clone (bench_memory: P/2 per rank)
    assert "the optimiser's master is this rank's share of them" in (out / "launch.log").read_text()
    # ZeRO-3 saves gathered full weights: the checkpoint loads and has every LLM tensor at full size
    from qllava.modeling.checkpoint import load_model
    m, _ = load_model(out)
    ref = load_file(one_process / "model.safetensors")
    assert all(m.state_dict()[k].shape == v.shape for k, v in ref.items() if k in m.state_dict())


def _kill_when_checkpointed(cmd, out, env, min_step=2):
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "checkpoints" / "latest_step"
    t0 = time.time()
    while time.time() - t0 < 600:
        if latest.exists() and int(latest.read_text().split("-")[1]) >= min_step: break
        if p.poll() is not None: pytest.fail(f"the run ended before it could be killed (exit {p.returncode})")
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "summary.json").exists(), "the run finished before the kill"


@pytest.mark.parametrize("stage,packing", [("finetune", False), ("lora", False), ("lora", True)])
def test_killed_and_resumed_run_ends_with_the_same_weights(data, projector, tmp_path, stage, packing):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    extra = dict(pretrain_mm_mlp_adapter=projector / "mm_projector.bin", save_steps=2, save_total_limit=2,
                 num_train_epochs=3, per_device_train_batch_size=4)
    if packing: extra.update(PACKED, per_device_train_batch_size=2)  # and 4 accumulation steps per optimiser step
    if stage == "lora": extra.update(lora_r=4, lora_alpha=8)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    cmd = lambda out, *more: [sys.executable, "-m", "qllava.training.train", *flags(data, out, stage, **extra), *more]
    subprocess.run(cmd(whole), check=True, env=env, capture_output=True)
    _kill_when_checkpointed(cmd(broken), broken, env)
    r = subprocess.run(cmd(broken, "--resume_from_checkpoint", "last"), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resumed from" in r.stdout
    files = ["adapter/adapter_model.safetensors", "mm_projector.safetensors"] if stage == "lora" else ["model.safetensors"]
    for f in files:
        a, b = load_file(whole / f), load_file(broken / f)
        assert a.keys() == b.keys()
        for k in a: assert torch.equal(a[k], b[k]), f"{f}:{k} differs after resume"
    assert losses(whole)[-1] == losses(broken)[-1]
    steps = lambda d: [r["step"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps(broken) == steps(whole) == sorted(set(steps(whole)))   # one record per step: none repeated after the resume
    assert losses(broken) == losses(whole)
    if stage == "lora":  # merging the adapters gives the same logits as running them unmerged
        from qllava.modeling.checkpoint import load_lora_run, merge_lora
        unmerged, tok = load_lora_run(whole)
        merged = merge_lora(whole, tmp_path / "merged")
        ids = tok("USER: Is the tile red? ASSISTANT:", return_tensors="pt").input_ids
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, unmerged(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
        from qllava.modeling.checkpoint import load_model
        again, _ = load_model(tmp_path / "merged")
        with torch.no_grad(): torch.testing.assert_close(again(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_two_torchrun_node_launchers_on_loopback_train_one_model(data, projector, tmp_path):
    from qllava.cluster.launch import free_port
    port = free_port()
    out = tmp_path / "two-nodes"
    nodes = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "qllava-test",
               "-m", "qllava.training.train", *flags(data, out, pretrain_mm_mlp_adapter=projector / "mm_projector.bin",
                                            per_device_train_batch_size=4, num_train_epochs=1)]
        nodes.append(subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and (out / "model.safetensors").exists()


def test_bad_data_fails_the_launch_before_training_naming_the_record(data, tmp_path):
    bad = json.loads((data / "ft.json").read_text())
    bad[5]["image"] = "missing.png"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    args = flags(data, tmp_path / "out", "pretrain", data_path=tmp_path / "bad.json")
    with pytest.raises(LaunchError) as e: ds_launch(args, tmp_path / "out")
    assert "bad.json:5 (id 'q5')" in str(e.value) and "missing.png" in str(e.value)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_held_out_loss_and_accuracy_land_in_the_logs_during_training(data, projector, tmp_path):
    qs = [{"question_id": f"h{i}", "image": f"{i}.png", "text": "Is the tile red?"} for i in range(8)]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(q) for q in qs))
    (tmp_path / "gt.json").write_text(json.dumps([{"id": f"h{i}", "answer": "yes" if i % 2 == 0 else "no",
                                                    "answer_type": "CLOSED", "yes_no_answer": "yes" if i % 2 == 0 else "no"} for i in range(8)]))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "qllava.training.train", *flags(data, out, pretrain_mm_mlp_adapter=projector / "mm_projector.bin",
                        eval_data_path=data / "ft.json", eval_questions=tmp_path / "q.jsonl", eval_gt=tmp_path / "gt.json",
                        eval_steps=3, eval_max_new_tokens=4)], env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in recs if "eval_loss" in x]
    accs = [x for x in recs if "closed_accuracy" in x]
    assert [x["step"] for x in evals][:2] == [3, 6] and len(accs) >= 2
    assert all(0 <= x["closed_accuracy"] <= 100 for x in accs)
    s = json.loads((out / "summary.json").read_text())
    assert "eval_loss" in s and "closed_accuracy" in s
    # ZeRO-3 partitions the weights, so answering during training is refused before anything starts
    bad = subprocess.run([sys.executable, "-m", "qllava.training.train", *flags(data, tmp_path / "z3", deepspeed="zero3",
                          eval_questions=tmp_path / "q.jsonl", eval_gt=tmp_path / "gt.json")], capture_output=True, text=True)
    assert bad.returncode == 2 and "ZeRO-3" in bad.stderr
