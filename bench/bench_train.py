"""Stage-2 training throughput, padding waste and achieved FLOP/s on the `bench` preset, side by side in one run.

Model: `qllava.model.build_model(llm="preset:bench-llama", encoders={"image": "preset:bench-vit-b32"},
tokenizer="llama-demo")` -- a ViT-B/32-shaped CLIP tower (224 px, 49 patch tokens, 12 layers of 768) and a
LLaMA-shaped LLM (8 layers of 768, MLP 2048, vocabulary 32,000, ~106M parameters), random weights, mlp2x_gelu
projector. `build_model` resizes the LLM's embeddings to len(tokenizer) (1,187 for llama-demo), which would shrink the
preset's 32,000-row embedding and head to 1,187 rows and the LLM to ~58M parameters; so the benchmark pads the
vocabulary back to the preset's 32,000 (`qllava.model.resize_embeddings`) and reports the as-built size too.

1. Training speed: the stage-2 step (`qllava.train.apply_stage` of the `finetune` preset: LLM + projector trainable,
   encoder frozen) on the training engine's path -- `qllava.train.init_distributed` (a group of one),
   `qllava.train.make_optimizer` (fused AdamW) over `qllava.train.param_groups`, `deepspeed.initialize` with
   `qllava.train.deepspeed_config("zero2", ...)`, then engine(**batch) / engine.backward / engine.step. One fixed
   batch of 4 samples from the synthetic LLaVA-like set below (1 image = 49 media tokens + 100-200 text tokens
   each, collated by `DataCollator`); warm-up steps, then N timed steps: mean, standard deviation, min, max.
2. Padding: the share of computed tokens (batch x padded length) that are padding, over one epoch of batches
   actually produced by `MultimodalDataset` + a batch sampler + `DataCollator` (batch 4, one rank): plain random
   batches (LLaVA without --group_by_modality_length), `ModalityLengthGroupedSampler` with group_by_modality
   False / True and megabatch_steps 1 (LLaVA's grouping) / 8 (qllava's default). Two data sets: the shipped demo
   pathology finetune.json (300 records, 30 text-only) and a synthetic LLaVA-like mix (documented in
   `synthetic_records`). Media are not decoded for this part (a stub processor), since they do not change lengths.
3. FLOP/s: the machine's fp32 matmul peak (best of repeated 2048x2048 `torch.matmul`, measured before and after
   the training timing, in this process, with torch's default threads) and the training step's achieved FLOP/s
   from the formula written out in `step_flops` (also the plain 6*N*T estimate).

Writes bench/results/train.json and train.md and prints the table.

    python bench/bench_train.py [--steps 8] [--warmup 2] [--batch 4] [--synthetic 2000]
"""
import argparse, json, math, os, platform, random, statistics, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

VOCAB = 32000  # the bench-llama preset's vocabulary (a LLaMA tokenizer's size)


# ---------------------------------------------------------------- machine
def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"): cpu = line.split(":", 1)[1].strip(); break
    except OSError: pass
    import transformers, deepspeed
    return dict(cpu_model=cpu, cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch_interop_threads=torch.get_num_interop_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                deepspeed=deepspeed.__version__, platform=platform.platform(),
                mkldnn=torch.backends.mkldnn.is_available(), loadavg_start=os.getloadavg())


def matmul_peak(n:int=2048, repeats:int=5, inner:int=3) -> dict:
    "fp32 matmul FLOP/s: best and median of `repeats` timings of `inner` back-to-back n x n products."
    a, b = torch.randn(n, n), torch.randn(n, n); c = torch.empty(n, n)
    torch.matmul(a, b, out=c)  # warm-up
    rates, cpu_rates = [], []
    for _ in range(repeats):
        t, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner): torch.matmul(a, b, out=c)
        rates.append(2 * n ** 3 * inner / (time.perf_counter() - t))
        cpu_rates.append(2 * n ** 3 * inner / max(time.process_time() - c0, 1e-9))
    return dict(n=n, best=max(rates), median=statistics.median(rates), all=rates, per_cpu_second=cpu_rates)


# ---------------------------------------------------------------- data
def demo_records() -> list:
    from qllava.presets import demo_paths
    return json.loads(demo_paths("pathology")["finetune"].read_text())


def synthetic_records(n:int, seed:int=0, text_share:float=0.1) -> list:
    """A LLaVA-665k-like mix made of the demo's own sentences (so the tokenizer sees realistic text):
    image records (90%) hold 1 image and k question/answer pairs with k uniform in 1..8 (VQA-style multi-turn to
    single long answers); text-only records (10%, as ShareGPT in LLaVA-665k) hold k uniform in 2..16 pairs, so
    they are longer on average. Questions/answers are drawn from the demo pathology finetune turns."""
    rng = random.Random(seed)
    pairs = []
    for r in demo_records():
        c = r["conversations"]
        for q, a in zip(c[0::2], c[1::2]):
            pairs.append((q["value"].replace("<image>\n", "").replace("<image>", "").strip(), a["value"]))
    tiles = sorted({r["image"] for r in demo_records() if "image" in r})
    out = []
    for i in range(n):
        text = rng.random() < text_share
        k = rng.randint(2, 16) if text else rng.randint(1, 8)
        conv = []
        for j, (q, a) in enumerate(rng.sample(pairs, k)):
            conv += [{"from": "human", "value": ("<image>\n" + q) if (j == 0 and not text) else q}, {"from": "gpt", "value": a}]
        rec = {"id": f"syn{i:05d}", "conversations": conv}
        if not text: rec["image"] = rng.choice(tiles)
        out.append(rec)
    return out


class StubImage:
    "Stands in for the image processor in the padding count: a tiny tensor, no file decoded (lengths do not depend on pixels)."
    def __call__(self, path): return torch.zeros(3, 1, 1)


def make_dataset(records, tokenizer, n_tokens:int, processor=None, max_length:int=2048):
    from qllava.dataset import MultimodalDataset
    from qllava.presets import demo_paths
    return MultimodalDataset(records, tokenizer, "vicuna_v1", demo_paths("pathology")["media_folder"],
                             {"image": processor or StubImage()}, {"image": n_tokens}, max_length)


def padding_epoch(samples:list, pad_id:int, batches:list) -> dict:
    "Real vs computed tokens over one epoch: every rank's batches (lists of sample indices), each collated."
    from qllava.dataset import DataCollator
    coll = DataCollator(pad_id)
    real = computed = n = mixed = 0
    for idx in batches:
        part = [samples[i] for i in idx]
        b = coll(part)
        real += int(b["attention_mask"].sum()); computed += b["input_ids"].numel(); n += len(part)
        mixed += len({s["images"] is None for s in part}) > 1
    return dict(batches=len(batches), samples=n, real_tokens=real, computed_tokens=computed,
                padding_tokens=computed - real, padding_share=(computed - real) / computed, mixed_modality_batches=mixed)


def padding_bench(ds, batch:int, seed:int=0, ranks=(1, 2)) -> list:
    """Padding of one epoch for random batches and for the sampler's settings, on 1 and 2 ranks (`batch` per rank;
    all ranks' batches counted). The random baseline uses the permutation the sampler draws for epoch 0 (numpy's
    generator seeded [seed, 0] equals one seeded `seed`), so it differs from the sampler rows by the grouping alone."""
    from qllava.dataset import ModalityLengthGroupedSampler
    import numpy as np
    samples = [ds[i] for i in range(len(ds))]                       # tokenised once; every configuration collates these
    pad = ds.tokenizer.pad_token_id
    rows = []
    for R in ranks:
        perm = np.random.default_rng(seed).permutation(len(ds)).tolist()
        rand = [perm[k:k + batch] for k in range(0, len(perm), batch)]
        rows.append(dict(sampler="random batches (no grouping)", ranks=R, group_by_modality=None, megabatch_steps=None,
                         **padding_epoch(samples, pad, rand)))
        for gbm in (False, True):
            for K in (1, 8):
                bs = []
                for r in range(R):
                    s = ModalityLengthGroupedSampler(ds.lengths, batch_size=batch, num_replicas=R, rank=r, seed=seed,
                                                     group_by_modality=gbm, modalities=ds.modalities, megabatch_steps=K)
                    bs += s.batches(0)
                rows.append(dict(sampler="ModalityLengthGroupedSampler", ranks=R, group_by_modality=gbm, megabatch_steps=K,
                                 **padding_epoch(samples, pad, bs)))
    return rows


# ---------------------------------------------------------------- model + FLOPs
def linear_params(module) -> int:
    "Weights that multiply every token passing through `module` (Linear / Conv weights; biases, norms, lookups excluded)."
    n = 0
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)): n += m.weight.numel()
    return n


def step_flops(model, batch:dict) -> dict:
    """Training FLOPs of one stage-2 step (multiply-add = 2 FLOPs), written out:
      LLM (trainable):  T = B x L computed tokens (padding included: it is computed).
        forward  2 * N_llm * T  with N_llm = the LLM's Linear weights (q,k,v,o, gate,up,down per layer, lm_head;
                 the input embedding is a lookup, 0 FLOPs) + attention 4 * L * d per token per layer (QK^T and AV,
                 full L x L as sdpa computes it with a mask);
        backward 2x forward (gradients w.r.t. activations and w.r.t. weights): 4 * N_llm * T + 8 * L * d * layers * T.
      projector (trainable): 6 * N_proj * T_media, T_media = images x 49.
      encoder (frozen, forward only, no backward because nothing before it needs gradients):
        2 * N_enc * T_enc + 4 * S * d_enc * layers * T_enc, T_enc = images x 50 (CLS + 49 patches; all 12 layers
        run although the features come from layer -2); the patch conv counts on the 49 patches only.
      The optimiser step (AdamW, ~10-15 elementwise FLOPs per trainable weight) is not counted as matmul work but its
      time is in the step. `simple_6NT` is the usual estimate 6 * (N_llm + N_proj) * T + 2 * N_enc * T_enc."""
    B, L = batch["input_ids"].shape
    T = B * L
    llm_cfg = model.llm.config
    d, layers = llm_cfg.hidden_size, llm_cfg.num_hidden_layers
    n_llm = linear_params(model.llm)
    n_proj = linear_params(model.projectors)
    enc = model.encoders["image"]
    tower_cfg = enc.tower.config
    conv = sum(m.weight.numel() for m in enc.modules() if isinstance(m, torch.nn.Conv2d))  # the patch embedding
    n_enc = linear_params(enc) - conv
    M = batch["images"].shape[0]
    S = (tower_cfg.image_size // tower_cfg.patch_size) ** 2 + 1
    T_media, T_enc = M * enc.num_tokens, M * S
    llm_fwd = 2 * n_llm * T + 4 * L * d * layers * T
    llm = 3 * llm_fwd
    proj = 6 * n_proj * T_media
    enc_f = 2 * n_enc * T_enc + 2 * conv * M * (S - 1) + 4 * S * tower_cfg.hidden_size * tower_cfg.num_hidden_layers * T_enc
    total = llm + proj + enc_f
    return dict(B=B, L=L, tokens_computed=T, tokens_real=int(batch["attention_mask"].sum()), images=M,
                media_tokens=T_media, encoder_tokens=T_enc, N_llm_matmul=n_llm, N_proj=n_proj, N_enc_matmul=n_enc + conv,
                llm_flops=llm, projector_flops=proj, encoder_flops=enc_f, total=total,
                simple_6NT=6 * (n_llm + n_proj) * T + 2 * (n_enc + conv) * T_enc)


def training_batch(tokenizer, n_tokens:int, processor, batch:int, seed:int=0) -> dict:
    "One realistic stage-2 batch: `batch` image samples with 100-200 text tokens, close in length (as grouping gives)."
    from qllava.dataset import DataCollator
    ds = make_dataset(synthetic_records(400, seed=seed + 1, text_share=0.0), tokenizer, n_tokens, processor)
    texts = [l - n_tokens for l in ds.lengths]
    pool = [i for i, t in enumerate(texts) if 100 <= t <= 200]
    rng = random.Random(seed)
    start = rng.randrange(0, max(1, len(pool) - batch))
    pool.sort(key=lambda i: texts[i])
    idx = pool[start:start + batch]
    return DataCollator(tokenizer.pad_token_id)([ds[i] for i in idx])


def build_bench_model():
    from qllava.model import build_model, resize_embeddings
    t = time.perf_counter()
    model, tok = build_model(llm="preset:bench-llama", encoders={"image": "preset:bench-vit-b32"}, tokenizer="llama-demo")
    as_built = sum(p.numel() for p in model.llm.parameters())
    rows_built = model.llm.get_input_embeddings().weight.shape[0]
    resize_embeddings(model.llm, max(VOCAB, len(tok)))
    return model, tok, dict(build_seconds=round(time.perf_counter() - t, 1), tokenizer_size=len(tok),
                            llm_params_as_built=as_built, embedding_rows_as_built=rows_built,
                            embedding_rows_used=model.llm.get_input_embeddings().weight.shape[0])


def train_bench(model, batch:dict, steps:int, warmup:int, budget:float=300.0) -> dict:
    "Time `steps` stage-2 steps after `warmup` (fewer, but at least 3, once the timed steps pass `budget` seconds)."
    import deepspeed
    from qllava.config import TrainConfig, resolve_config
    from qllava.train import (apply_stage, param_groups, deepspeed_config, init_distributed, make_optimizer, share_fp32_master,
                              trainable_summary)
    cfg = resolve_config(TrainConfig(stage="finetune", deepspeed="zero2"))
    rank, world = init_distributed()
    model = apply_stage(model, cfg); model.train()
    opt = make_optimizer(param_groups(model, cfg), cfg)  # as build_run: --optim's AdamW kernel
    B = batch["input_ids"].shape[0]
    ds_cfg = deepspeed_config("zero2", B, 1, world, False, False, cfg.max_grad_norm)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    share_fp32_master(engine)
    b = {k: v.to(engine.device) for k, v in batch.items()}
    fwd, bwd, stp, tot, cpu, losses = [], [], [], [], [], []
    for k in range(warmup + steps):
        if len(tot) >= 3 and sum(tot) > budget:
            print(f"  time budget of {budget:.0f} s reached after {len(tot)} timed steps", flush=True); break
        t0 = time.perf_counter(); cpu0 = time.process_time()
        out = engine(**b)
        t1 = time.perf_counter()
        engine.backward(out.loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        losses.append(out.loss.item())
        if k >= warmup:
            fwd.append(t1 - t0); bwd.append(t2 - t1); stp.append(t3 - t2); tot.append(t3 - t0); cpu.append(time.process_time() - cpu0)
        print(f"  step {k + 1}/{warmup + steps}{' (warm-up)' if k < warmup else ''}: {t3 - t0:.2f} s "
              f"(fwd {t1 - t0:.2f}, bwd {t2 - t1:.2f}, opt {t3 - t2:.2f}; cpu {time.process_time() - cpu0:.2f} s) loss {losses[-1]:.4f}", flush=True)
    summ = lambda xs: dict(mean=statistics.mean(xs), std=statistics.stdev(xs) if len(xs) > 1 else 0.0, min=min(xs), max=max(xs))
    return dict(world_size=world, zero_stage=engine.zero_optimization_stage(), ds_config=ds_cfg,
                trainable=trainable_summary(model), step_seconds=summ(tot), forward_seconds=summ(fwd),
                backward_seconds=summ(bwd), optimizer_seconds=summ(stp), step_cpu_seconds=summ(cpu), step_times=tot,
                losses=losses)


# ---------------------------------------------------------------- report
def fmt(x, d=0): return f"{x:,.{d}f}"


def markdown(res:dict) -> str:
    m, t, f, pk = res["machine"], res["train"], res["flops"], res["peak"]
    st = t["step_seconds"]
    lines = ["# Training benchmark (bench preset)", "",
             f"{m['cpu_model']}, {m['cpus']} CPUs, torch threads {m['torch_threads']}, Python {m['python']}, torch {m['torch']}, "
             f"transformers {m['transformers']}, deepspeed {m['deepspeed']}; {res['date']}. "
             f"Load average at start / end: {m['loadavg_start'][0]:.1f} / {res['loadavg_end'][0]:.1f} (other processes shared the 2 cores).", "",
             f"Model: bench-vit-b32 tower ({fmt(res['params']['encoder'])} params, frozen) + mlp2x_gelu projector "
             f"({fmt(res['params']['projector'])}) + bench-llama LLM ({fmt(res['params']['llm'])} params with the preset's "
             f"{fmt(res['model']['embedding_rows_used'])}-row vocabulary; {fmt(res['model']['llm_params_as_built'])} as `build_model` "
             f"leaves it with {res['model']['embedding_rows_as_built']} rows).", "",
             "## Stage-2 training step (LLM + projector trainable, encoder frozen; DeepSpeed ZeRO-2, torch AdamW, 1 rank)", "",
             "| metric | value |", "|---|---:|",
             f"| batch | {f['B']} samples x {f['L']} tokens ({f['images']} images = {f['media_tokens']} media tokens; {f['tokens_real']} real tokens) |",
             f"| timed steps (after {res['args']['warmup']} warm-up) | {len(t['step_times'])} |",
             f"| step time, mean +- std (min-max) | {st['mean']:.2f} +- {st['std']:.2f} s ({st['min']:.2f}-{st['max']:.2f}) |",
             f"| forward / backward / optimizer step (mean) | {t['forward_seconds']['mean']:.2f} / {t['backward_seconds']['mean']:.2f} / {t['optimizer_seconds']['mean']:.2f} s |",
             f"| samples/s (mean, from mean step time) | {res['samples_per_s']:.3f} |",
             f"| tokens/s (real tokens, media included) | {fmt(res['tokens_per_s'], 1)} |",
             f"| tokens/s (computed, B x L) | {fmt(res['computed_tokens_per_s'], 1)} |",
             f"| training FLOPs per step (formula below) | {f['total'] / 1e9:,.1f} GFLOP (LLM {f['llm_flops'] / 1e9:,.1f}, projector {f['projector_flops'] / 1e9:,.2f}, encoder {f['encoder_flops'] / 1e9:,.1f}) |",
             f"| achieved FLOP/s | {res['achieved_flops'] / 1e9:,.1f} GFLOP/s |",
             f"| fp32 matmul peak, 2048x2048 (best; median) | {pk['best'] / 1e9:,.1f}; {pk['median'] / 1e9:,.1f} GFLOP/s |",
             f"| process CPU time per step (mean; both threads) | {t['step_cpu_seconds']['mean']:.2f} s (wall {st['mean']:.2f} s) |",
             f"| FLOPs per CPU-second, step vs matmul (contention-robust ratio) | {res['flops_per_cpu_second'] / 1e9:,.1f} vs {pk['per_cpu_second_best'] / 1e9:,.1f} GFLOP = {res['cpu_efficiency']:.1%} |",
             f"| unloaded bound (CPU time / {m['torch_threads']} threads): step, samples/s, tokens/s | {res['unloaded_bound']['step_seconds']:.2f} s, {res['unloaded_bound']['samples_per_s']:.3f}, {res['unloaded_bound']['tokens_per_s']:,.1f} |",
             f"| **achieved / peak** | **{res['mfu']:.1%}** (vs median peak {res['mfu_median']:.1%}; simple 6NT estimate {res['mfu_6nt']:.1%}) |",
             "", f"## Padding share of computed tokens over one epoch (batch {res['args']['batch']} per rank)", "",
             "| data | ranks | sampler | group_by_modality | megabatch_steps | batches | real tokens | computed tokens | padding share | mixed-modality batches |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, rows in res["padding"].items():
        for r in rows:
            g = "-" if r["group_by_modality"] is None else str(r["group_by_modality"])
            K = "-" if r["megabatch_steps"] is None else str(r["megabatch_steps"]) + (" (LLaVA)" if r["megabatch_steps"] == 1 else " (default)")
            lines.append(f"| {name} | {r['ranks']} | {r['sampler']} | {g} | {K} | {r['batches']} | {fmt(r['real_tokens'])} | {fmt(r['computed_tokens'])} | "
                         f"{r['padding_share']:.1%} | {r['mixed_modality_batches']} |")
    lines += ["", "Data: `demo` = shipped demo pathology finetune.json (300 records, 30 text-only); "
              f"`synthetic` = {res['args']['synthetic']} LLaVA-like records (90% 1 image + 1-8 QA pairs, 10% text-only with 2-16 pairs; "
              "demo sentences). Media tokens (49 per image) count as real tokens.", "",
              "## FLOPs formula", "",
              "Multiply-add = 2 FLOPs; T = B x L computed tokens (padding is computed); N_llm = the LLM's Linear weights "
              f"({fmt(f['N_llm_matmul'])}: attention, MLP, lm_head; the input embedding is a lookup); N_proj = {fmt(f['N_proj'])}; "
              f"N_enc = {fmt(f['N_enc_matmul'])} (tower Linear + patch conv).", "",
              "- LLM forward: 2 N_llm T + attention 4 L d n_layers T (QK^T and AV over the full L x L); backward = 2 x forward "
              "(activation and weight gradients), so LLM = 3 x forward.",
              "- projector (trainable): 6 N_proj T_media (T_media = images x 49).",
              "- encoder (frozen, forward only): 2 N_enc T_enc + 4 S d_enc n_layers T_enc (T_enc = images x 50, all 12 layers run).",
              "- not counted: norms, activations, softmax, the loss, AdamW (its time is in the step).",
              f"- plain estimate 6 (N_llm + N_proj) T + 2 N_enc T_enc = {f['simple_6NT'] / 1e9:,.1f} GFLOP.", "",
              f"Total run time {res['run_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="timed training steps (at most)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps")
    ap.add_argument("--budget", type=float, default=120.0, help="stop timing (after at least 3 steps) once the timed steps took this many seconds")
    ap.add_argument("--batch", type=int, default=4, help="samples per step")
    ap.add_argument("--synthetic", type=int, default=2000, help="records of the synthetic LLaVA-like set")
    ap.add_argument("--out", default=str(HERE / "results"), help="results folder")
    args = ap.parse_args(argv)
    t_run = time.perf_counter()
    torch.manual_seed(0)
    res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), args=vars(args), machine=machine_info())
    print(f"machine: {res['machine']['cpu_model']}, {res['machine']['cpus']} CPUs, torch threads {res['machine']['torch_threads']}, "
          f"load {res['machine']['loadavg_start'][0]:.1f}", flush=True)

    print("fp32 matmul peak (before)...", flush=True)
    peak0 = matmul_peak()

    print("building the bench model...", flush=True)
    model, tok, info = build_bench_model()
    res["model"] = info
    res["params"] = {p: sum(x.numel() for x in getattr(model, p).parameters()) for p in ("llm", "encoders", "projectors")}
    res["params"] = dict(llm=res["params"]["llm"], encoder=res["params"]["encoders"], projector=res["params"]["projectors"])
    n_tok = model.config.encoder_num_tokens["image"]

    print("padding over one epoch...", flush=True)
    t = time.perf_counter()
    res["padding"] = {"demo": padding_bench(make_dataset(demo_records(), tok, n_tok), args.batch),
                      "synthetic": padding_bench(make_dataset(synthetic_records(args.synthetic), tok, n_tok), args.batch)}
    res["padding_seconds"] = round(time.perf_counter() - t, 1)

    batch = training_batch(tok, n_tok, model.encoders["image"].processor, args.batch)
    print(f"training: batch {tuple(batch['input_ids'].shape)}, images {tuple(batch['images'].shape)}", flush=True)
    res["train"] = train_bench(model, batch, args.steps, args.warmup, args.budget)
    res["flops"] = step_flops(model, batch)

    print("fp32 matmul peak (after)...", flush=True)
    peak1 = matmul_peak()
    rates = peak0["all"] + peak1["all"]
    cpu_rates = peak0["per_cpu_second"] + peak1["per_cpu_second"]
    res["peak"] = dict(n=2048, best=max(rates), median=statistics.median(rates), per_cpu_second_best=max(cpu_rates),
                       before=peak0, after=peak1)

    st = res["train"]["step_seconds"]["mean"]
    f = res["flops"]
    res["samples_per_s"] = f["B"] / st
    res["tokens_per_s"] = f["tokens_real"] / st
    res["computed_tokens_per_s"] = f["tokens_computed"] / st
    res["achieved_flops"] = f["total"] / st
    res["mfu"] = res["achieved_flops"] / res["peak"]["best"]
    res["mfu_median"] = res["achieved_flops"] / res["peak"]["median"]
    res["mfu_6nt"] = f["simple_6NT"] / st / res["peak"]["best"]
    cpu_st = res["train"]["step_cpu_seconds"]["mean"]
    res["flops_per_cpu_second"] = f["total"] / cpu_st
    res["cpu_efficiency"] = res["flops_per_cpu_second"] / res["peak"]["per_cpu_second_best"]
    # what the step would take with every torch thread on a core of its own (no other load): CPU time / threads;
    # a lower bound on the time (perfect thread scaling assumed), so an upper bound on the speed
    idle = cpu_st / res["machine"]["torch_threads"]
    res["unloaded_bound"] = dict(step_seconds=idle, samples_per_s=f["B"] / idle, tokens_per_s=f["tokens_real"] / idle,
                                 flops=f["total"] / idle, peak=res["peak"]["per_cpu_second_best"] * res["machine"]["torch_threads"])
    res["loadavg_end"] = os.getloadavg()
    res["run_seconds"] = time.perf_counter() - t_run

    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    md = markdown(res)
    (out / "train.md").write_text(md)
    print(md)
    return 0


def run(argv=None) -> int:
    t = time.perf_counter()
    try: return main(argv)
    finally:
        import torch.distributed as dist
        if dist.is_initialized(): dist.destroy_process_group()
        print(f"done in {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(run())
