"""Memory of construction, training and checkpoint loading, next to theory, on 2 CPU DeepSpeed ranks.

Model: a LLaMA built from a config and saved once as a transformers folder (random fp32 weights, as a stand-in for a
downloaded Vicuna), shrunk in width and depth to fit this shared machine: hidden 1024, MLP 2816, 16 heads, vocabulary
32,000 and `--layers` layers (8 by default: 168M parameters; Vicuna-7B is 4096 / 11008 / 32 layers). The issue asked for
~1B; but a rank peaks at about its fixed overhead (~1 GB) + 4 P during a ZeRO-2 fp32 step (P for 1B = 4 GB), times 2
ranks, plus ~1.5 GB for the two launcher processes: a 1B model needs ~35 GB, 300-500M still 12-18 GB, more than the
~8 GB this benchmark may take next to other jobs; 168M peaks at ~8 GB. The image tower is the tiny preset
(`preset:tiny-clip`, frozen, ~0.1M parameters) so the LLM dominates.
P = one full fp32 copy of the model's parameters (bytes).

1. Construction and training (`--worker`, launched with `qllava.cluster.launch` on 2 CPU ranks over gloo, as tests/test_train.py
   does), for ZeRO-2, ZeRO-3 and ZeRO-3 offload (the shipped presets) x fp32 and bf16 weights. Each rank: the fixed
   overhead first (the same path on `preset:tiny-llama`: imports, DeepSpeed, tokenizer, tiny parts), then
   `qllava.modeling.model.build_model(folder, placement=Placement(dtype, ds_config=qllava.training.train.deepspeed_config(preset, ...))` (peak RSS after
   construction), then the stage-2 setup of `qllava.training.train.build_run` (`apply_stage` finetune, `partition`,
   `make_optimizer` over `param_groups`, `deepspeed.initialize` with the config's `auto` buckets sized from the LLM's
   width as `build_run` does, `share_fp32_master`) and 3 optimiser steps on a fixed text-only batch (1 x 64 tokens; the
   tower still runs on a dummy input). `--variants`: `qllava` (that path: fused AdamW, the fp32 master shared with fp32
   weights) and `deepspeed` (the original's per-tensor `adamw_torch`, DeepSpeed's own master clone), side by side.
   Figures: VmHWM (peak RSS) and RssAnon (anonymous memory held) from /proc/self/status. The ranks run with glibc's
   mmap threshold fixed (`--mmap-threshold`), so freed buffers leave RSS at once instead of staying in the heap.
   Theory per rank, 2 ranks: see THEORY / LAYOUT below and the notes written under the table.
2. Loading (one process each, fresh interpreters, interleaved, median of `--repeats`): `qllava.modeling.checkpoint.load_checkpoint`
   of a qllava checkpoint of the same model vs transformers' `AutoModelForCausalLM.from_pretrained` of the LLM folder,
   fp32 and bf16; time, peak RSS right after loading (both loaders keep same-dtype tensors as copy-on-write views of the
   file, read when first used, so this can be far below P) and after reading every weight once (as a first forward
   does); and the previous qllava loader (random init, then the state dict copied in) for reference.

3. QLoRA's base (`--parts qlora`): the same LLM built by `qllava.modeling.model.build_model` in bf16 and in 4 bits (bitsandbytes
   NF4 with double quantisation, `qllava.modeling.checkpoint.quantization_config` of `--stage qlora`), one fresh process each,
   interleaved, median of `--repeats`: the bytes the LLM's weights hold (the quantisation constants included), peak RSS
   after construction, and peak RSS after 3 LoRA steps (r 8 on every linear layer, `apply_stage` as `qllava train`
   runs it, plain AdamW, 1 x 64 tokens; single process, no DeepSpeed: what the base costs, not the sharding).

Targets: ZeRO-3 construction <= 0.6 P + the fixed overhead; training within 15 % of theory; load_checkpoint
<= 1.3 x transformers' time and peak memory.

Writes bench/results/memory.json and memory.md and prints the table.

    python bench/bench_memory.py [--layers 8] [--repeats 5] [--configs zero2,zero3,zero3_offload] [--dtypes fp32,bf16]
    python bench/bench_memory.py --parts loading --keep      # re-measure one part, keep the other from memory.json
    python bench/bench_memory.py --render                    # rewrite memory.md from memory.json
"""
import argparse, gc, json, os, platform, statistics, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def status() -> dict:
    "This process's current and peak resident memory (bytes), from /proc/self/status."
    out = {}
    for line in open("/proc/self/status"):
        k = line.split(":")[0]
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"): out[k] = int(line.split()[1]) * 1024
    return out


def llm_config(layers:int) -> dict:
    return dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


MAKE_CODE = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
from qllava.data.presets import load_tokenizer
from bench_memory import llm_config
folder, layers, ck = Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
if not (folder / "model.safetensors").exists():
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**llm_config(layers))).save_pretrained(folder)
    load_tokenizer("llama-demo").save_pretrained(folder)
if not (ck / "qllava_manifest.json").exists():  # a qllava checkpoint of the same model, for the loaders
    from qllava.modeling.model import Placement, build_model
    from qllava.modeling.checkpoint import save_checkpoint
    model, tok = build_model(str(folder), {"image": "preset:tiny-clip"}, tokenizer="llama-demo")
    save_checkpoint(model, ck, tokenizer=tok, stage="finetune")
"""


def make_llm(folder:Path, layers:int, ck:Path) -> int:
    "Save the benchmark LLM (random fp32 weights, seed 0) as a transformers folder, and a qllava checkpoint of the model (a subprocess)."
    subprocess.run([sys.executable, "-c", MAKE_CODE, str(HERE), str(folder), str(layers), str(ck)], check=True, capture_output=True)
    cfg = llm_config(layers)
    h, f, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    return n * (4 * h * h + 3 * h * f + 2 * h) + h + 2 * v * h  # parameters


# ---------------------------------------------------------------- 1. construction and training, on each rank
def worker(a) -> None:
    import torch
    import deepspeed  # noqa: F401 (imported before measuring: part of the overhead)
    from qllava.modeling.model import Placement, build_model
    from qllava.modeling.weights import full_numel, partition, release_memory
    from qllava.config import TrainConfig, resolve_config
    from qllava.training.train import apply_stage, deepspeed_config, init_distributed, make_optimizer, param_groups, share_fp32_master
    rank, world = init_distributed()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    ds = deepspeed_config(a.zero, 1, 1, world, bf16=a.dtype == "bf16")
    rec = {"rank": rank, "world": world, "zero": a.zero, "dtype": a.dtype, "after_imports": status()}
    tiny, _ = build_model("preset:tiny-llama", {"image": "preset:tiny-clip"}, tokenizer="llama-demo", placement=Placement(dtype, ds_config=ds))
    del tiny; gc.collect(); release_memory()
    rec["overhead"] = status()
    t = time.perf_counter()
    model, tok = build_model(a.llm, {"image": "preset:tiny-clip"}, tokenizer="llama-demo", placement=Placement(dtype, ds_config=ds))
    rec["construct_s"], rec["construct"] = time.perf_counter() - t, status()
    rec["params"] = sum(full_numel(p) for p in model.parameters())
    rec["share"] = sum((p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) for p in model.parameters())
    cfg = resolve_config(TrainConfig(stage="finetune", learning_rate=1e-5))
    model = partition(apply_stage(model, cfg), ds)
    model.train()
    rec["trainable"] = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    cfg.optim = VARIANTS[a.variant]["optim"]
    opt = make_optimizer(param_groups(model, cfg), cfg)
    ds = deepspeed_config(a.zero, 1, 1, world, bf16=a.dtype == "bf16", hidden_size=model.llm.config.hidden_size)  # as build_run sizes the buckets
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    rec["master_shared_bytes"] = share_fp32_master(engine) if VARIANTS[a.variant]["share_master"] else 0  # as build_run does
    rec["initialize"] = status()
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, len(tok), (1, 64), generator=g)
    t = time.perf_counter()
    losses, rec["phases"] = [], []
    for _ in range(a.steps):
        out = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        f = status()
        engine.backward(out.loss)
        b = status()
        engine.step()
        losses.append(float(out.loss))
        rec["phases"].append({"forward": f, "backward": b, "step": status()})
    rec["steps_s"], rec["train"], rec["losses"] = time.perf_counter() - t, status(), losses
    Path(a.out, f"{a.variant}-{a.zero}-{a.dtype}-rank{rank}.json").write_text(json.dumps(rec))


def qlora_worker(a) -> None:
    "One process: build the LLM in bf16 or 4 bits, measure, then 3 LoRA steps; writes a JSON record."
    import torch
    from qllava.modeling.model import Placement, build_model
    from qllava.config import TrainConfig, resolve_config
    from qllava.modeling.checkpoint import quantization_config
    from qllava.training.train import apply_stage, make_optimizer, param_groups
    cfg = resolve_config(TrainConfig(stage="qlora" if a.bits == 4 else "lora", lora_r=8, lora_alpha=16, learning_rate=1e-4))
    rec = {"bits": a.bits, "before": status()}
    t = time.perf_counter()
    model, tok = build_model(a.llm, {"image": "preset:tiny-clip"}, tokenizer="llama-demo", placement=Placement(
        torch.bfloat16, quantization_config=quantization_config(cfg, torch.bfloat16) if a.bits == 4 else None))
    rec["construct_s"], rec["construct"] = time.perf_counter() - t, status()
    qs = [m.weight.quant_state for m in model.llm.modules() if hasattr(getattr(m, "weight", None), "quant_state")]
    consts = sum(sum(v.numel() * v.element_size() for v in [q.absmax, *(getattr(q.state2, "absmax", None),
                                                                      getattr(q.state2, "code", None)), q.code] if v is not None)
                 for q in qs if q is not None)
    rec["llm_bytes"] = sum(p.numel() * p.element_size() for p in model.llm.parameters()) + consts
    rec["quantized_layers"] = len(qs)
    model = apply_stage(model, cfg)
    model.train()
    opt = make_optimizer(param_groups(model, cfg), cfg)
    ids = torch.randint(3, len(tok), (1, 64), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward(); opt.step(); opt.zero_grad(); losses.append(float(out.loss))
    rec["train"], rec["losses"] = status(), losses
    Path(a.out).write_text(json.dumps(rec))


def run_qlora(llm:Path, work:Path, bits:int, i:int) -> dict:
    out = work / f"qlora-{bits}-{i}.json"
    subprocess.run([sys.executable, __file__, "--qlora-worker", "--llm", str(llm), "--out", str(out), "--bits", str(bits)],
                   check=True, capture_output=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    return json.loads(out.read_text())


VARIANTS = {  # what is measured: qllava's training path (build_run) and, beside it, DeepSpeed's own layout with the original's optimiser
    "qllava": dict(optim="adamw_torch_fused", share_master=True),
    "deepspeed": dict(optim="adamw_torch", share_master=False)}
THEORY = {  # per rank, in units of P, 2 ranks: (construction, training as the issue states it, training as DeepSpeed lays it out)
    ("zero2", "fp32"): (1.0, 2.5, 2.5), ("zero2", "bf16"): (0.5, 2.5, 2.0),
    ("zero3", "fp32"): (0.5, 2.0, 2.5), ("zero3", "bf16"): (0.25, 2.25, 2.25),
    ("zero3_offload", "fp32"): (0.5, 2.0, 3.0), ("zero3_offload", "bf16"): (0.25, 2.25, 2.75)}
SHARED_MASTER = 0.5  # fp32 weights: qllava's master is the weights' own share (share_fp32_master), so DeepSpeed's P/2 clone is not held
LAYOUT = {  # what DeepSpeed 0.19 keeps between steps (read in stage_1_and_2.py / stage3.py and confirmed by the measurement)
    "zero2": "weights (fp32 P, bf16 P/2) + fp32 master share P/2 (also a clone when the weights are fp32) + AdamW m, v P; "
             "the gradient share is freed after each step",
    "zero3": "weight share (P/2, bf16 P/4) + fp32 master share P/2 + fp32 gradient share P/2 (a flat buffer kept) + AdamW m, v P",
    "zero3_offload": "as zero3, + P/2 for the host-side fp32 gradient share that offload keeps beside the device one "
                     "(on a GPU node that P/2 sits in host RAM, the rest of the device side on the GPU; here both are the same RAM, so "
                     "offload rows exceed the issue's single-memory figure by that copy: 2.5 P, not 2.0, with fp32 weights)"}


def training_row(zero:str, dtype:str, ranks:list, variant:str="deepspeed") -> dict:
    "One table row from the ranks' records: the larger rank for each figure."
    tc, tt, td = THEORY[zero, dtype]
    if VARIANTS[variant]["share_master"] and dtype == "fp32": td -= SHARED_MASTER
    big = lambda f: max(f(r) for r in ranks)
    return dict(variant=variant, zero=zero, dtype=dtype, theory_construct=tc, theory_train=tt, theory_ds=td, ranks=ranks,
                overhead=big(lambda r: r["overhead"]["VmHWM"]),
                construct=big(lambda r: r["construct"]["VmHWM"] - r["overhead"]["VmHWM"]),
                initialize=big(lambda r: r["initialize"]["RssAnon"] - r["overhead"]["RssAnon"]),
                held=big(lambda r: r["train"]["RssAnon"] - r["overhead"]["RssAnon"]),
                peak=big(lambda r: r["train"]["VmHWM"] - r["overhead"]["VmHWM"]),
                construct_s=big(lambda r: r["construct_s"]), steps_s=big(lambda r: r["steps_s"]), losses=ranks[0]["losses"])


def run_training(llm:Path, out:Path, zero:str, dtype:str, steps:int, rank_env:dict|None=None, variant:str="qllava") -> list[dict]:
    from qllava.cluster.launch import LaunchSpec, launch
    env = {"QLLAVA_ALLOW_CPU_BF16": "1"} if dtype == "bf16" else {}
    env.update(rank_env or {})
    launch([str(Path(__file__).resolve()), "--worker", "--llm", str(llm), "--out", str(out), "--zero", zero, "--dtype", dtype,
            "--steps", str(steps), "--variant", variant], out / f"launch-{variant}-{zero}-{dtype}", spec=LaunchSpec(launcher="deepspeed", gpus_per_node=0, cpu_ranks=2, env=env),
           hang_timeout=1200, echo=False)
    return [json.loads((out / f"{variant}-{zero}-{dtype}-rank{r}.json").read_text()) for r in (0, 1)]


# ---------------------------------------------------------------- 2. loading, one fresh process per measurement
LOAD_CODE = r'''
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
which, path, dtype = sys.argv[2], sys.argv[3], dict(fp32=torch.float32, bf16=torch.bfloat16)[sys.argv[4]]
from bench_memory import status
import transformers, deepspeed, qllava.modeling.model, qllava.modeling.checkpoint
from transformers import AutoModelForCausalLM
before = status()
t = time.perf_counter()
if which == "transformers": m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
elif which == "qllava": m = qllava.modeling.checkpoint.load_checkpoint(path, dtype=dtype)
else:  # the previous qllava loader: the model built with random weights, then the whole state dict read and copied in
    from qllava.modeling.model import QllavaConfig, QllavaForCausalLM
    from qllava.modeling.checkpoint import load_folder_weights
    m = QllavaForCausalLM(QllavaConfig.from_pretrained(path))
    m.load_state_dict(load_folder_weights(path), strict=False)
    m = m.to(dtype)
dt = time.perf_counter() - t
loaded = status()
with torch.no_grad(): s = sum(float(p.float().sum()) for p in m.parameters())  # every weight read once
print(json.dumps({"which": which, "dtype": sys.argv[4], "seconds": dt, "before": before, "loaded": loaded, "touched": status(),
                  "params": sum(p.numel() for p in m.parameters()), "dtypes": sorted({str(p.dtype) for p in m.parameters()}), "checksum": s}))
'''


def run_load(which:str, path:Path, dtype:str) -> dict:
    r = subprocess.run([sys.executable, "-c", LOAD_CODE, str(HERE), which, str(path), dtype], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    if r.returncode: raise RuntimeError(f"{which} {dtype}: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    "Versions without importing them (this parent process stays small: the ranks and loaders are measured, not it)."
    from importlib.metadata import version
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
    mem = next((int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), None)
    return dict(cpu_model=cpu, cpus=os.cpu_count(), mem_total=mem, python=platform.python_version(), torch=version("torch"),
                transformers=version("transformers"), deepspeed=version("deepspeed"), platform=platform.platform(),
                loadavg_start=os.getloadavg(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def gb(x) -> str: return f"{x / 2**30:.2f}"


def tables(res:dict) -> str:
    P, m = res["P_bytes"], res["machine"]
    x = lambda v: f"{v / P:.2f}"
    lines = ["# Memory benchmark: construction, training and loading\n",
             f"{m['cpu_model'].split()[0]}, {m['cpus']} CPUs, {m['mem_total'] / 2**30:.0f} GB RAM shared with other jobs; Python {m['python']}, torch {m['torch']}, "
             f"transformers {m['transformers']}, deepspeed {m['deepspeed']}; {m['date']}. Load average at start / end: "
             f"{m['loadavg_start'][0]:.1f} / {res['loadavg_end'][0]:.1f} (other jobs shared the 2 cores). Parts measured: "
             f"{'; '.join(f'{k} {d} (load {l:.1f})' for k, (d, l) in res.get('when', {}).items())}.\n",
             f"Model: a LLaMA of hidden 1024, MLP 2816, {res['layers']} layers, vocabulary 32,000 ({res['llm_params']:,} parameters; with the "
             f"tiny-clip tower and the projector {res['params']:,}), built from its config and saved as a transformers folder in fp32 "
             f"(scaled down from the issue's ~1B to fit ~8 GB for 2 ranks, see the script). **P = {gb(P)} GB** (one fp32 copy). 2 CPU ranks "
             f"(gloo) through `qllava.cluster.launch`, the shipped DeepSpeed presets (buckets sized from the width as `build_run` does), "
             f"batches of 1 x 64 tokens. Two paths side by side: `qllava` = what `build_run` does (fused AdamW, the `--optim` default; "
             f"fp32 weights double as DeepSpeed's fp32 master, `share_fp32_master`), `deepspeed` = DeepSpeed's own layout with the "
             f"original's `adamw_torch` (per-tensor AdamW, the master always a clone). Rank environment: {res['rank_env'] or 'default'} (freed buffers leave RSS at once).\n",
             "## Per rank, in units of P above the fixed overhead, next to theory\n",
             "`overhead` = the same path on `preset:tiny-llama` (imports, DeepSpeed, tokenizer, tiny parts), VmHWM in GB. "
             "`construct` = peak RSS (VmHWM) after `build_model(folder, dtype, ds_config)`, before any step. After `deepspeed.initialize` "
             "and after 3 steps: `held` = anonymous memory (RssAnon: what DeepSpeed and the model allocated; unlike the total RSS it does "
             "not move when the kernel evicts library pages under the other jobs' memory pressure), `peak` = VmHWM, which adds the "
             "transients of a step (DeepSpeed's fp64 gradient-norm copies, AdamW's temporaries, the gathered layers). Theory: "
             "`issue` = the issue's figures, `DS` = what DeepSpeed 0.19 keeps (below). The larger of the 2 ranks.\n",
             "| ZeRO | weights | path | overhead GB | construct (theory) | initialize | held after 3 steps (theory issue / DS) | held / issue, / DS | peak after 3 steps | peak / issue | construct s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["training"]:
        lines.append(f"| {r['zero']} | {r['dtype']} | {r.get('variant', 'deepspeed')} | {gb(r['overhead'])} | {x(r['construct'])} ({r['theory_construct']}) | {x(r['initialize'])} | "
                     f"{x(r['held'])} ({r['theory_train']} / {r['theory_ds']}) | {r['held'] / (r['theory_train'] * P):.2f}, "
                     f"{r['held'] / (r['theory_ds'] * P):.2f} | {x(r['peak'])} | {r['peak'] / (r['theory_train'] * P):.2f} | {r['construct_s']:.1f} |")
    lines += ["\nTargets: ZeRO-3 construction <= 0.60 P above the overhead; training within 15 % of theory.\n",
              "Theory. Construction: the whole weights under ZeRO-2 (P fp32, P/2 bf16; fp32 ones stay copy-on-write views of the file "
              "until used, so ~0 here), each rank's share under ZeRO-3 (P/2, P/4). Issue: ZeRO-2 P + P/2 + P, ZeRO-3 P/2 + P/2 + P "
              "(weights + gradient share + AdamW m, v), with bf16 weights their bf16 copy + the fp32 master share P/2 + the gradient "
              "share P/2 + P. DeepSpeed's layout:\n"]
    lines += [f"- {k}: {v}" for k, v in LAYOUT.items()]
    lines += ["- qllava path: the same, less the fp32 master clone when the weights are fp32 (P/2: the master is the weights' "
              "own share; DeepSpeed 0.19's ZeRO-3 means to do this but compares a torch.device with a string, ZeRO-2 never does)\n",
              "Peak within a step (VmHWM; the issue's theory counts only what is kept): the qllava path peaks 0.27-0.99 P below the "
              "`deepspeed` path (fused AdamW has none of the per-tensor kernel's weight-sized temporaries; fp32 weights also lose the "
              "master clone). What is left: "
              "ZeRO-2 flattens the reduced gradient share into one fp32 buffer while the bucketed one still exists (~P/2) and "
              "takes its norm; ZeRO-3 keeps the gathered layers live from the forward to the backward up to the preset's "
              "`stage3_max_live_parameters` (LLaVA's zero3.json: 1e9), which is the whole of this 170M model (+P/2 fp32, "
              "+P/4 bf16) but a fixed 1e9 parameters (~2 GB bf16, 0.14 of a 7B model's bf16 copy) at 7B.\n"]
    lines += ["\n## Loading: qllava `load_checkpoint` vs transformers `from_pretrained` of the same LLM (one process each, fresh interpreters)\n",
              "| loader | dtype | time s (median) | peak after load GB | peak after reading every weight once GB | vs transformers: time, peak read |",
              "|---|---|---:|---:|---:|---:|"]
    for r in res["loading"]:
        ref = next(q for q in res["loading"] if q["which"] == "transformers" and q["dtype"] == r["dtype"])
        lines.append(f"| {r['which']} | {r['dtype']} | {r['seconds']:.2f} | {gb(r['loaded'])} | {gb(r['touched'])} | "
                     f"{r['seconds'] / ref['seconds']:.2f}x, {r['touched'] / ref['touched']:.2f}x |")
    lines += ["\nPeaks are VmHWM growth over the interpreter after its imports; times the median of interleaved runs (all runs in "
              "memory.json). Same-dtype tensors are copy-on-write views of the file in both loaders (read when first used), so "
              "`peak after load` is small and reading every weight once (as a first forward does) brings the file in; bf16 from an fp32 "
              "file: transformers holds the file's pages and the bf16 copy, qllava lets each 64 MB of the file go once cast. "
              "`previous qllava` = the loader before this change (the model built with random weights, the state dict read whole and "
              "copied in), for reference. Target: load_checkpoint <= 1.3 x transformers' time and peak.\n",
              f"Total run time {res['seconds']:.0f} s."]
    if res.get("qlora"):
        b16 = next(r for r in res["qlora"] if r["bits"] == 16)
        lines += ["\n## QLoRA's base: 4-bit NF4 beside bf16\n",
                  "The same LLM through `build_model`, bf16 vs bitsandbytes NF4 + double quantisation (`--stage qlora`'s), one "
                  "process each, median of interleaved runs; growth over the process before the build (its imports): `held` = "
                  "anonymous memory (RssAnon: what the model and optimiser keep), `peak` = VmHWM (adds the transients: the "
                  "fp32 file's weights are read before bitsandbytes quantises them). LoRA r 8 on every linear layer, 3 AdamW "
                  "steps, 1 x 64 tokens.\n",
                  "| base | linear layers in 4 bits | LLM weights GB | vs bf16 | held after construction GB | "
                  "held after 3 LoRA steps GB | peak after construction GB | peak after 3 LoRA steps GB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {'bf16' if r['bits'] == 16 else 'NF4 4-bit'} | {r['quantized_layers']} | {gb(r['llm_bytes'])} | "
                  f"{r['llm_bytes'] / b16['llm_bytes']:.2f}x | {gb(r['held_construct'])} | {gb(r['held_train'])} | "
                  f"{gb(r['construct'])} | {gb(r['train'])} |" for r in res["qlora"]]
        lines.append("\nbitsandbytes quantises the decoder's linear layers only; the embeddings and the LM head stay in 16 bits, "
                     "and `--stage qlora` then runs peft's prepare_model_for_kbit_training, as the original's "
                     "`finetune_qlora.sh` does, which casts every 16-bit parameter left (embeddings, head, norms) to fp32. In "
                     "this model the two 32,000 x 1,024 matrices are 39 % of the weights, so that fp32 copy takes back what "
                     "4 bits saved once training starts; in Vicuna-7B they are 4 % (0.26 B of 6.7 B parameters): the base is "
                     "~3.3 GB in NF4 + ~1 GB fp32 embeddings and head, against 13.5 GB in bf16.")
    return "\n".join(lines) + "\n"


def main(a) -> int:
    t0 = time.time()
    rank_env = {"MALLOC_MMAP_THRESHOLD_": str(a.mmap_threshold)} if a.mmap_threshold else {}
    res = {"machine": machine_info(), "layers": a.layers, "rank_env": ", ".join(f"{k}={v}" for k, v in rank_env.items())}
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-memory-"))
    llm, ck = work / f"llama-{a.layers}l", work / f"qllava-{a.layers}l"
    res["llm_params"] = make_llm(llm, a.layers, ck)
    parts = a.parts.split(",")
    old = json.loads((HERE / "results" / "memory.json").read_text()) if a.keep and (HERE / "results" / "memory.json").exists() else {}
    res["params"], res["P_bytes"] = old.get("params"), old.get("P_bytes")
    res["when"] = {k: v for k, v in old.get("when", {}).items() if k not in parts}  # part -> (date, load average at its start)
    res["when"].update({k: (res["machine"]["date"], res["machine"]["loadavg_start"][0]) for k in parts})
    res["training"] = [] if "training" in parts else old.get("training", [])
    for zero in a.configs.split(",") if "training" in parts else []:
      for dtype in a.dtypes.split(","):
        for variant in a.variants.split(","):  # side by side, one after the other
            print(f"== {variant} {zero} {dtype}", flush=True)
            ranks = run_training(llm, work, zero, dtype, a.steps, rank_env=rank_env, variant=variant)
            res["params"] = ranks[0]["params"]
            P = res["P_bytes"] = 4 * res["params"]
            row = training_row(zero, dtype, ranks, variant)
            res["training"].append(row)
            print(f"   overhead {gb(row['overhead'])} GB; construct {row['construct'] / P:.2f} P (theory {row['theory_construct']}); after "
                  f"{a.steps} steps held {row['held'] / P:.2f} P (theory {row['theory_train']} / {row['theory_ds']}), peak {row['peak'] / P:.2f} P", flush=True)
    res["loading"] = [] if "loading" in parts else old.get("loading", [])
    for dtype in ("fp32", "bf16") if "loading" in parts else []:
        which = (("transformers", llm), ("qllava", ck), ("previous qllava", ck))
        runs = {w: [] for w, _ in which}
        for _ in range(a.repeats):  # interleaved, so a burst of load from other jobs hits every loader alike
            for w, path in which: runs[w].append(run_load(w.split()[0] if w != "previous qllava" else "previous", path, dtype))
        for w, _ in which:
            rs = runs[w]
            row = dict(which=w, dtype=dtype, seconds=statistics.median(r["seconds"] for r in rs),
                       loaded=statistics.median(r["loaded"]["VmHWM"] - r["before"]["VmHWM"] for r in rs),
                       touched=statistics.median(r["touched"]["VmHWM"] - r["before"]["VmHWM"] for r in rs), runs=rs)
            res["loading"].append(row)
            print(f"   load {w} {dtype}: {row['seconds']:.2f} s, peak +{gb(row['loaded'])} / touched +{gb(row['touched'])} GB", flush=True)
    res["qlora"] = [] if "qlora" in parts else old.get("qlora", [])
    if "qlora" in parts:
        runs = {16: [], 4: []}
        for i in range(a.repeats):
            for bits in runs: runs[bits].append(run_qlora(llm, work, bits, i))
        for bits, rs in runs.items():
            med = lambda f: statistics.median(f(r) for r in rs)
            row = dict(bits=bits, llm_bytes=rs[0]["llm_bytes"], quantized_layers=rs[0]["quantized_layers"],
                       construct=med(lambda r: r["construct"]["VmHWM"] - r["before"]["VmHWM"]),
                       train=med(lambda r: r["train"]["VmHWM"] - r["before"]["VmHWM"]), seconds=med(lambda r: r["construct_s"]),
                       held_construct=med(lambda r: r["construct"]["RssAnon"] - r["before"]["RssAnon"]),
                       held_train=med(lambda r: r["train"]["RssAnon"] - r["before"]["RssAnon"]),
                       losses=rs[0]["losses"], runs=rs)
            res["qlora"].append(row)
            print(f"   {bits}-bit base: weights {gb(row['llm_bytes'])} GB, held after construction +{gb(row['held_construct'])}, "
                  f"after 3 LoRA steps +{gb(row['held_train'])} GB (peaks {gb(row['construct'])}, {gb(row['train'])})", flush=True)
    res["loadavg_end"], res["seconds"] = os.getloadavg(), time.time() - t0
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "memory.json").write_text(json.dumps(res, indent=1, default=str))
    md = tables(res)
    (HERE / "results" / "memory.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--mmap-threshold", type=int, default=131072, help="glibc MALLOC_MMAP_THRESHOLD_ for the ranks (0: glibc's own)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--configs", default="zero2,zero3,zero3_offload")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--variants", default="qllava,deepspeed", help="qllava: build_run's fused AdamW and shared fp32 master; deepspeed: torch's "
                    "per-tensor AdamW (the original's adamw_torch) and DeepSpeed's own master clone")
    ap.add_argument("--variant", default="qllava", help=argparse.SUPPRESS)
    ap.add_argument("--parts", default="training,loading,qlora", help="which parts to measure; with --keep the others come from results/memory.json")
    ap.add_argument("--keep", action="store_true", help="keep the parts not measured now from the last results/memory.json")
    ap.add_argument("--render", action="store_true", help="only rewrite results/memory.md from results/memory.json")
    ap.add_argument("--workdir", default=None, help="keep the model folders here (reused when present)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--qlora-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bits", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--llm"); ap.add_argument("--out"); ap.add_argument("--zero"); ap.add_argument("--dtype")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker: worker(a)
    elif a.qlora_worker: qlora_worker(a)
    elif a.render:
        res = json.loads((HERE / "results" / "memory.json").read_text())
        res["training"] = [training_row(r["zero"], r["dtype"], r["ranks"], r.get("variant", "deepspeed")) for r in res["training"]]
        (HERE / "results" / "memory.json").write_text(json.dumps(res, indent=1, default=str))
        (HERE / "results" / "memory.md").write_text(tables(res)); print(tables(res))
    else: sys.exit(main(a))
