"""Dtype-true and ZeRO-3 construction, and checkpoint loading without random init.

- under ZeRO-3 (2 CPU ranks through the real deepspeed launcher) `build_model` returns every parameter partitioned
  (`ds_status` NOT_AVAILABLE, an empty placeholder, this rank's share at most half of it), and no rank's memory grew
  by a whole copy of the model while building it;
- a ZeRO-3 run started from a stage-1 projector file holds that file's values (gathered and compared), LoRA adapters
  start as LoRA does (B = 0) and alike on every rank, and the parameter counts of the log and summary.json equal
  ZeRO-2's;
- `build_model(placement=Placement(torch.bfloat16))` gives bf16 parameters without ever holding the fp32 model (peak RSS);
- `load_checkpoint` / `import_llava` never run a random initialiser: every aten op that fills a real (not meta)
  tensor with random numbers is recorded while they run (TorchDispatchMode observes; nothing is patched).
"""
import json, os, subprocess, sys, textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.timeout(900)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    "A ~84M-parameter LLaMA saved in fp32 (336 MB): big enough for memory to tell a whole copy from a share."
    from transformers import LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("llm84m")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=24, num_attention_heads=8, vocab_size=8000,
                      max_position_embeddings=256, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _python(code:str, *args) -> dict:
    "Run `code` in a fresh interpreter (its own peak RSS); it prints one JSON line last."
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_bf16_build_never_materialises_fp32(llm_folder):
    out = _python("""
        import json, resource, sys, torch
        from qllava.modeling.model import Placement, build_model
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        build_model(tokenizer="llama-demo")  # imports, tokenizer and tiny parts: the fixed overhead
        before = peak()
        model, _ = build_model(sys.argv[1], tokenizer="llama-demo", placement=Placement(torch.bfloat16))
        print(json.dumps({"grew": peak() - before, "llm_dtypes": sorted({str(p.dtype) for p in model.llm.parameters()}),
                          "all_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                          "numel": sum(p.numel() for p in model.llm.parameters())}))
        """, llm_folder)
    fp32 = out["numel"] * 4
    assert out["llm_dtypes"] == out["all_dtypes"] == ["torch.bfloat16"]
    # the bf16 model is fp32 / 2; converting the file 64 MB at a time adds little (here the 16 MB embedding)
    assert out["grew"] < 0.7 * fp32, f"peak RSS grew by {out['grew'] / 2**20:.0f} MB while the fp32 model is {fp32 / 2**20:.0f} MB"


RANDOM_FILLS = {"normal_", "uniform_", "bernoulli_", "random_", "exponential_", "geometric_", "log_normal_", "cauchy_",
                "normal", "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "multinomial"}


def _random_fills(fn):
    "(result of fn(), elements of real tensors filled with random numbers while it ran), observed at the dispatcher."
    from torch.utils._python_dispatch import TorchDispatchMode
    class Watch(TorchDispatchMode):
        n = 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in RANDOM_FILLS:
                t = out if isinstance(out, torch.Tensor) else args[0]
                if isinstance(t, torch.Tensor) and t.device.type != "meta": Watch.n += t.numel()
            return out
    with Watch(): result = fn()
    return result, Watch.n


def test_load_checkpoint_and_import_llava_never_run_a_random_init(tmp_path):
    from qllava.modeling.model import Placement, build_model
    from qllava.modeling.checkpoint import save_checkpoint, load_checkpoint, import_llava
    from qllava.data.presets import load_tokenizer
    from test_checkpoint import _write_original
    (model, tok), n_build = _random_fills(lambda: build_model(seed=0))
    assert n_build >= sum(p.numel() for p in model.llm.parameters())  # the watch sees a random init when there is one
    save_checkpoint(model, tmp_path / "ck", tokenizer=tok, stage="finetune")
    total = sum(p.numel() for p in model.parameters())
    loaded, n = _random_fills(lambda: load_checkpoint(tmp_path / "ck"))
    # what is left is a constructor's own `torch.randn` (CLIP's class embedding, 64 values) put on meta at once, never an init pass
    assert n < 1e-3 * total, f"{n} elements were filled with random numbers while loading"
    a, b = loaded.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ck, llm, clip, proj = _write_original(tmp_path, load_tokenizer("llama-demo"))
    (imported, _), n = _random_fills(lambda: import_llava(ck))
    assert n < 1e-3 * sum(p.numel() for p in imported.parameters()), f"{n} elements were filled with random numbers while importing"
    got = imported.llm.state_dict()  # the vocabulary grew by <image> (and pad): the original rows come first
    assert all(torch.equal(got[k][:len(v)], v) for k, v in llm.state_dict().items())
    assert torch.equal(imported.projectors["image"][0].weight, proj[0].weight)
    bf, n = _random_fills(lambda: load_checkpoint(tmp_path / "ck", dtype=torch.bfloat16))
    assert n < 1e-3 * total and {p.dtype for p in bf.parameters()} == {torch.bfloat16}


ZERO3_SCRIPT = r'''
import json, math, os, resource, sys
from pathlib import Path
import torch
out, llm_folder, data = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
import deepspeed
from qllava.config import parse_config
from qllava.training.train import init_distributed, deepspeed_config, build_run, trainable_summary
from qllava.modeling.model import Placement, build_model
from qllava.modeling.weights import full_numel, is_partitioned
from qllava.modeling.checkpoint import load_state_file
rank, world = init_distributed()
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
res = {"rank": rank}
build_model(tokenizer="llama-demo", placement=Placement(ds_config=deepspeed_config("zero3", 1, 1, world)))  # imports, tiny parts: the fixed overhead
before = peak()
model, _ = build_model(llm_folder, tokenizer="llama-demo", placement=Placement(ds_config=deepspeed_config("zero3", 1, 1, world)))
res["grew"] = peak() - before
ps = list(model.parameters())
res["n_params"], res["all_partitioned"] = len(ps), all(is_partitioned(p) for p in ps)
res["not_available"] = all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in ps)
res["placeholders_empty"] = all(p.numel() == 0 for p in ps)
res["share_at_most_half"] = all(p.ds_tensor.numel() <= math.ceil(p.ds_numel / world) for p in ps)
res["share"], res["whole"] = sum(p.ds_tensor.numel() for p in ps), sum(full_numel(p) for p in ps)
del model, ps
# a stage-2 run from a stage-1 projector file, set up as `python -m qllava.training.train` sets it up
args = ["--data_path", data / "ft.json", "--image_folder", data / "img", "--output_dir", out / "run", "--model_max_length", 128,
        "--global_batch_size", 4, "--seed", 3, "--deepspeed", "zero3"]
for stage in ("finetune", "lora"):
    extra = ["--pretrain_mm_mlp_adapter", data / "mm_projector.bin"] + (["--lora_r", 4, "--lora_alpha", 8] if stage == "lora" else [])
    cfg = parse_config([str(a) for a in ["--stage", stage, *args, *extra]])
    run = build_run(cfg)
    m = run.model
    res[f"{stage}_partitioned"] = all(is_partitioned(p) for p in m.parameters())
    with deepspeed.zero.GatheredParameters(list(m.projectors.parameters())):
        got = {k: v.clone() for k, v in m.projectors["image"].state_dict().items()}
    want = {k.split("mm_projector.", 1)[1]: v for k, v in load_state_file(data / "mm_projector.bin").items()}
    res[f"{stage}_projector_equal"] = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    res[f"{stage}_counts"] = trainable_summary(m)
    if stage == "lora":
        lora = [p for n, p in m.named_parameters() if "lora_B" in n]
        with deepspeed.zero.GatheredParameters(lora): res["lora_b_zero"] = bool(lora) and all(not p.any() for p in lora)
        a = [p for n, p in m.named_parameters() if "lora_A" in n]
        with deepspeed.zero.GatheredParameters(a): res["lora_a_sum"] = float(sum(p.double().sum() for p in a))
    del run, m
(out / f"rank{rank}.json").write_text(json.dumps(res))
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "Eight red / blue tiles with yes / no answers, and a stage-1 projector file for the run's base (seed 3)."
    import numpy as np
    from PIL import Image
    from qllava.modeling.model import Placement, build_model
    from qllava.modeling.checkpoint import save_projector
    d = tmp_path_factory.mktemp("data"); (d / "img").mkdir()
    rng, recs = np.random.default_rng(0), []
    for i in range(8):
        a = rng.integers(0, 40, (40, 56, 3), dtype=np.uint8); a[..., 0 if i % 2 == 0 else 2] += 180
        Image.fromarray(a).save(d / "img" / f"{i}.png")
        recs.append({"id": f"q{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nIs the tile red?"}, {"from": "gpt", "value": "Yes" if i % 2 == 0 else "No"}]})
    (d / "ft.json").write_text(json.dumps(recs))
    model, _ = build_model(seed=3)
    with torch.no_grad():
        for p in model.projectors.parameters(): p.add_(torch.randn_like(p))  # a "trained" projector, unlike the run's fresh one
    save_projector(model, d)
    return d


def _reference_counts(stage):
    "What ZeRO-2 counts: the same model built whole (ZeRO-2 never partitions parameters)."
    from qllava.modeling.model import Placement, build_model
    from qllava.config import TrainConfig, resolve_config
    from qllava.training.train import apply_stage, trainable_summary
    kw = dict(lora_r=4, lora_alpha=8) if stage == "lora" else {}
    model, _ = build_model(seed=3)
    return trainable_summary(apply_stage(model, resolve_config(TrainConfig(stage=stage, **kw))))


def test_zero3_builds_partitioned_and_starts_from_the_stage1_projector(llm_folder, data, tmp_path):
    from qllava.cluster.launch import LaunchSpec, launch
    script = tmp_path / "zero3_build.py"
    script.write_text(ZERO3_SCRIPT)
    launch([script, tmp_path, llm_folder, data], tmp_path, spec=LaunchSpec(launcher="deepspeed", gpus_per_node=0, cpu_ranks=2),
           hang_timeout=600, echo=False)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    fp32 = res[0]["whole"] * 4
    for r in res:
        assert r["all_partitioned"] and r["not_available"] and r["placeholders_empty"] and r["share_at_most_half"], r
        assert r["share"] <= r["whole"] / 2 + r["n_params"]  # each rank holds half of every tensor (rounded up)
        # a whole copy per rank is what building without zero.Init costs; here a share plus the tensor being read
        assert r["grew"] < 0.75 * fp32, f"rank {r['rank']}: peak RSS grew by {r['grew'] / 2**20:.0f} MB, the fp32 model is {fp32 / 2**20:.0f} MB"
        for stage in ("finetune", "lora"):
            assert r[f"{stage}_partitioned"] and r[f"{stage}_projector_equal"], (stage, r)
            assert r[f"{stage}_counts"] == _reference_counts(stage), stage
        assert r["lora_b_zero"]
    assert res[0]["lora_a_sum"] == res[1]["lora_a_sum"]  # one set of adapters, not one per rank


def test_zero3_run_logs_and_summarises_the_zero2_counts(data, tmp_path):
    "The real entry point: the setup log line and summary.json carry whole-model counts under ZeRO-3."
    from qllava.cluster.launch import LaunchSpec, launch
    out = tmp_path / "z3"
    args = ["-m", "qllava.training.train", "--stage", "finetune", "--data_path", data / "ft.json", "--image_folder", data / "img",
            "--output_dir", out, "--model_max_length", 128, "--global_batch_size", 4, "--max_steps", 1, "--seed", 3,
            "--deepspeed", "zero3", "--pretrain_mm_mlp_adapter", data / "mm_projector.bin", "--save_strategy", "no"]
    launch(args, out, spec=LaunchSpec(launcher="deepspeed", gpus_per_node=0, cpu_ranks=2), hang_timeout=600, echo=False)
    want = _reference_counts("finetune")
    assert json.loads((out / "summary.json").read_text())["trainable"] == want
    assert f"trainable {want}" in (out / "launch.log").read_text()
