"""Stage-2 training throughput, padding waste and achieved FLOP/s, and a side-by-side run against the ORIGINAL LLaVA code.

Parts (`--parts padding,original,step`, run in that order; the results of parts not run are kept from the existing
train.json, so `--parts original` reruns the side-by-side alone):

padding -- the share of computed tokens (rows x width) that are padding, over one epoch of batches actually produced by
   `MultimodalDataset` + a batch sampler (batch 4 per rank, 1 and 2 ranks): plain random batches (LLaVA without
   --group_by_modality_length), `ModalityLengthGroupedSampler` with group_by_modality False / True and megabatch_steps
   1 (LLaVA's grouping) / 8 (qllava's default). Each epoch is collated three ways: `DataCollator` (one padded row per
   sample) and `qllava.data.packing.PackingCollator` with its bare default budget (the micro-batch's longest sample) and
   with 2048 tokens (as `--packing True` lays rows: --model_max_length wide); rows per sample shown for the packed. Two
   data sets: the shipped demo pathology finetune.json and a synthetic LLaVA-like mix (`synthetic_records`). Media are
   not decoded for this part (a stub processor), since they do not change lengths. Tokenizer: llama-demo.
original -- the original LLaVA-1.5 training code (haotian-liu/LLaVA as released on PyPI, llava-torch 1.2.2.post1: its
   own `llava.train.train.train()`, unmodified, in the scratch venv tests/parity/ installs; LLAVA_ORIG_VENV, default
   /tmp/llava-orig-venv) and `python -m qllava.training.train`, each in its own single process on CPU, on the same model folders
   (a Vicuna-shaped LLaMA with the real LLaMA-2 vocabulary and a QuiltNet-B/32-shaped CLIP tower, random weights, plus
   one stage-1 projector file both start from; written once by `side_assets` into QLLAVA_BENCH_ORIG_DIR, default
   /tmp/qllava-bench-train-orig), the same records (the demo pathology finetune.json and its images) and the same
   flags (Quilt-LLaVA's stage-2 recipe scaled down, `side_flags`). Runs alternate, `--side-repeats` times: the
   original with random batches (Quilt's flags), qllava random, grouped, packed (--packing True: rows of
   --model_max_length, 2048), the original grouped. The original is driven by bench/_original_train_driver.py (a TrainerCallback stamping
   each step, counters around what the LLM is given and the tower; it changes nothing). Steady-state samples/s, real
   and computed tokens/s, padding share and MFU (`qllava.modeling.flops` model FLOPs over the best fp32 matmul rate measured
   here) leave out the first `--side-warmup` steps. Without the scratch venv the original's runs are skipped, with the
   reason printed and written to train.md.
step -- the stage-2 step on the `bench` preset (`qllava.modeling.model.build_model(llm="preset:bench-llama", encoders={"image":
   "preset:bench-vit-b32"}, tokenizer="llama-demo")`: a ViT-B/32-shaped CLIP tower (224 px, 49 patch tokens, 12
   layers of 768) and a LLaMA-shaped LLM (8 layers of 768, MLP 2048, vocabulary 32,000, ~106M parameters), random
   weights, mlp2x_gelu projector; `build_model` would shrink the preset's 32,000-row embedding and head to len(llama-demo)
   = 1,187 rows, so the benchmark pads the vocabulary back to 32,000 with `qllava.modeling.model.resize_embeddings`), on the
   training engine's path -- `qllava.training.train.apply_stage` of the `finetune` preset (LLM + projector trainable, encoder
   frozen), `init_distributed` (a group of one), `make_optimizer` over `param_groups`, `deepspeed.initialize` with
   `deepspeed_config("zero2", ...)`, then engine(**batch) / engine.backward / engine.step on one fixed batch of 4
   synthetic samples (1 image = 49 media tokens + 100-200 text tokens each): warm-up steps, then N timed steps; and
   FLOP/s: the machine's fp32 matmul peak (best of repeated 2048x2048 `torch.matmul`, before and after) and the step's
   achieved FLOP/s from the formula in `step_flops` (also the plain 6*N*T estimate).

Writes bench/results/train.json and train.md and prints the tables.

    python bench/bench_train.py [--parts padding,original,step] [--steps 6] [--warmup 1] [--batch 4] [--synthetic 2000]
                                [--side-steps 16] [--side-warmup 5] [--side-repeats 2]
"""
import argparse, json, math, os, platform, random, statistics, subprocess, sys, time
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
                mkldnn=torch.backends.mkldnn.is_available(), loadavg_start=os.getloadavg(), **qllava_commit())


def qllava_commit() -> dict:
    "The repository's commit, and whether qllava/ had uncommitted changes (the code the runs used)."
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    try: return dict(qllava_commit=git("rev-parse", "--short", "HEAD") or None, qllava_dirty=bool(git("status", "--porcelain", "qllava")))
    except OSError: return dict(qllava_commit=None, qllava_dirty=None)


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
    from qllava.data.presets import demo_paths
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
    from qllava.data.dataset import MultimodalDataset
    from qllava.data.presets import demo_paths
    return MultimodalDataset(records, tokenizer, "vicuna_v1", demo_paths("pathology")["media_folder"],
                             {"image": processor or StubImage()}, {"image": n_tokens}, max_length)


def padding_epoch(samples:list, pad_id:int, batches:list, collator=None) -> dict:
    """Real vs computed tokens over one epoch: every rank's batches (lists of sample indices), each collated by
    `collator` (default `DataCollator`: one row per sample, padded to the longest; a `PackingCollator` lays the
    samples into as few rows as fit its budget). Computed = rows x width (`qllava.data.packing.batch_counts`)."""
    from qllava.data.dataset import DataCollator
    from qllava.data.packing import batch_counts
    coll = collator or DataCollator(pad_id)
    real = computed = n = mixed = rows = 0
    for idx in batches:
        part = [samples[i] for i in idx]
        c = batch_counts(coll(part))
        real += c["tokens"]; computed += c["computed"]; n += len(part); rows += c["rows"]
        mixed += len({s["images"] is None for s in part}) > 1
    return dict(batches=len(batches), samples=n, real_tokens=real, computed_tokens=computed, padding_tokens=computed - real,
                padding_share=(computed - real) / computed, rows=rows, rows_per_sample=rows / max(n, 1),
                mixed_modality_batches=mixed)


PACK_BUDGETS = {"packed_longest": None, "packed_2048": 2048}  # PackingCollator budgets: the micro-batch's longest sample; 2048 tokens


def padding_bench(ds, batch:int, seed:int=0, ranks=(1, 2)) -> list:
    """Padding of one epoch for random batches and for the sampler's settings, on 1 and 2 ranks (`batch` per rank;
    all ranks' batches counted). The random baseline uses the permutation the sampler draws for epoch 0 (numpy's
    generator seeded [seed, 0] equals one seeded `seed`), so it differs from the sampler rows by the grouping alone.
    Every row's batches are collated three ways: padded (`DataCollator`, the row's own numbers) and packed
    (`qllava.data.packing.PackingCollator`, under `packed_longest`: rows of at most the micro-batch's longest sample, the
    collator's bare default; `packed_2048`: rows of up to 2048 tokens, as `--packing True` lays them at
    --model_max_length 2048)."""
    from qllava.data.dataset import ModalityLengthGroupedSampler
    from qllava.data.packing import PackingCollator
    import numpy as np
    samples = [ds[i] for i in range(len(ds))]                       # tokenised once; every configuration collates these
    pad = ds.tokenizer.pad_token_id
    def measure(bs):
        out = padding_epoch(samples, pad, bs)
        for name, budget in PACK_BUDGETS.items():
            p = padding_epoch(samples, pad, bs, PackingCollator(pad, budget))
            out[name] = {k: p[k] for k in ("computed_tokens", "padding_share", "rows", "rows_per_sample")}
        return out
    rows = []
    for R in ranks:
        perm = np.random.default_rng(seed).permutation(len(ds)).tolist()
        rand = [perm[k:k + batch] for k in range(0, len(perm), batch)]
        rows.append(dict(sampler="random batches (no grouping)", ranks=R, group_by_modality=None, megabatch_steps=None,
                         **measure(rand)))
        for gbm in (False, True):
            for K in (1, 8):
                bs = []
                for r in range(R):
                    s = ModalityLengthGroupedSampler(ds.lengths, batch_size=batch, num_replicas=R, rank=r, seed=seed,
                                                     group_by_modality=gbm, modalities=ds.modalities, megabatch_steps=K)
                    bs += s.batches(0)
                rows.append(dict(sampler="ModalityLengthGroupedSampler", ranks=R, group_by_modality=gbm, megabatch_steps=K,
                                 **measure(bs)))
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
    from qllava.data.dataset import DataCollator
    ds = make_dataset(synthetic_records(400, seed=seed + 1, text_share=0.0), tokenizer, n_tokens, processor)
    texts = [l - n_tokens for l in ds.lengths]
    pool = [i for i, t in enumerate(texts) if 100 <= t <= 200]
    rng = random.Random(seed)
    start = rng.randrange(0, max(1, len(pool) - batch))
    pool.sort(key=lambda i: texts[i])
    idx = pool[start:start + batch]
    return DataCollator(tokenizer.pad_token_id)([ds[i] for i in idx])


def build_bench_model():
    from qllava.modeling.model import MediaSetup, Placement, build_model
    from qllava.modeling.weights import resize_embeddings
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
    from qllava.training.train import (apply_stage, param_groups, deepspeed_config, init_distributed, make_optimizer, share_fp32_master,
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


# ---------------------------------------------------------------- side by side with the original LLaVA's train()
ORIG_VENV_DEFAULT = "/tmp/llava-orig-venv"
SIDE_DIR_DEFAULT = "/tmp/qllava-bench-train-orig"
ACCELERATE_PIN = "accelerate==0.21.0"  # llava-torch 1.2.2.post1's own pin; transformers 4.37.2's Trainer needs accelerate
# the bench-size LLM (Vicuna-shaped: LLaMA blocks, MLP = 2.6875 x width as 11008 / 4096, the real LLaMA-2 vocabulary
# of assets/tokenizers/llama2-spm) and CLIP tower (QuiltNet-B/32's geometry: 224 px, patch 32 = 49 patch tokens)
SIDE_LLM = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
            "hidden_size": 512, "initializer_range": 0.02, "intermediate_size": 1376, "max_position_embeddings": 4096,
            "model_type": "llama", "num_attention_heads": 8, "num_hidden_layers": 4, "num_key_value_heads": 8, "pad_token_id": 0,
            "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "torch_dtype": "float32", "transformers_version": "4.37.2", "use_cache": True, "vocab_size": 32000}
SIDE_CLIP = {"architectures": ["CLIPModel"], "initializer_factor": 1.0, "logit_scale_init_value": 2.6592, "model_type": "clip",
             "projection_dim": 64,
             "text_config": {"hidden_act": "quick_gelu", "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2,
                             "num_hidden_layers": 1, "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 64,
                             "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-05,
                             "model_type": "clip_text_model"},
             "vision_config": {"hidden_act": "quick_gelu", "hidden_size": 384, "intermediate_size": 1536, "num_attention_heads": 6,
                               "num_hidden_layers": 6, "image_size": 224, "patch_size": 32, "projection_dim": 64, "num_channels": 3,
                               "layer_norm_eps": 1e-05, "model_type": "clip_vision_model"},
             "torch_dtype": "float32", "transformers_version": "4.37.2"}
SIDE_SEED = 0
# run order within a repeat (the alternation): the original's random batches, qllava's three, the original grouped
SIDE_SCHEDULE = (("original", "random"), ("qllava", "random"), ("qllava", "grouped"), ("qllava", "packed2048"),
                 ("original", "grouped"))
SIDE_KEYS = ("original/random", "qllava/random", "original/grouped", "qllava/grouped", "qllava/packed2048")  # table order
SIDE_BASELINE = {"random": "random", "grouped": "grouped", "packed": "random", "packed2048": "random"}  # qllava mode -> the original's mode it is compared with
SIDE_MODE_FLAGS = {"packed2048": ["--packing", "True"]}  # qllava only: rows of --model_max_length (2048), the default


def side_assets(folder:Path) -> dict:
    """The model both sides train, written once (deterministic, seed `SIDE_SEED`) into `folder`, which stays outside the repo:
    llm/ (transformers LLaMA folder: config.json written for transformers 4.37.2, fp32 model.safetensors, the shipped
    llama2-spm tokenizer files), clip/ (a full CLIPModel folder as openai/clip-vit-* on the hub: config.json,
    preprocessor_config.json, fp32 weights; the tiny text tower is unused) and mm_projector.bin (a stage-1 projector in
    the original's format, `model.mm_projector.{0,2}.*`, given to both sides with --pretrain_mm_mlp_adapter)."""
    from qllava.testing.testbed import random_state_dict, safetensors_bytes, llama2_tokenizer_dir, TOKENIZER_FILES
    from qllava.testing.vocab import hf_json
    from qllava.data.media import CLIP_MEAN, CLIP_STD
    recipe = json.dumps(dict(llm=SIDE_LLM, clip=SIDE_CLIP, seed=SIDE_SEED, version=1), sort_keys=True)
    paths = dict(llm=folder / "llm", clip=folder / "clip", projector=folder / "mm_projector.bin")
    if (folder / "recipe.json").is_file() and (folder / "recipe.json").read_text() == recipe and all(p.exists() for p in paths.values()):
        return paths
    from transformers import LlamaConfig, LlamaForCausalLM, CLIPConfig, CLIPModel
    paths["llm"].mkdir(parents=True, exist_ok=True); paths["clip"].mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in SIDE_LLM.items() if k not in ("architectures", "transformers_version", "torch_dtype")}
    with torch.device("meta"): llm = LlamaForCausalLM(LlamaConfig(**cfg))
    (paths["llm"] / "model.safetensors").write_bytes(safetensors_bytes(random_state_dict(llm, SIDE_SEED)))
    (paths["llm"] / "config.json").write_bytes(hf_json(SIDE_LLM))
    (paths["llm"] / "generation_config.json").write_bytes(hf_json({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                                                  "transformers_version": "4.37.2"}))
    for n in TOKENIZER_FILES: (paths["llm"] / n).write_bytes((llama2_tokenizer_dir() / n).read_bytes())
    c = SIDE_CLIP
    with torch.device("meta"): clip = CLIPModel(CLIPConfig(text_config=c["text_config"], vision_config=c["vision_config"],
                                                           projection_dim=c["projection_dim"]))
    (paths["clip"] / "model.safetensors").write_bytes(safetensors_bytes(random_state_dict(clip, SIDE_SEED + 1)))
    (paths["clip"] / "config.json").write_bytes(hf_json(c))
    (paths["clip"] / "preprocessor_config.json").write_bytes(hf_json({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3, "size": 224}))
    d, v = SIDE_LLM["hidden_size"], c["vision_config"]["hidden_size"]
    g = torch.Generator().manual_seed(SIDE_SEED + 2)
    torch.save({"model.mm_projector.0.weight": torch.randn(d, v, generator=g) * 0.02, "model.mm_projector.0.bias": torch.zeros(d),
                "model.mm_projector.2.weight": torch.randn(d, d, generator=g) * 0.02, "model.mm_projector.2.bias": torch.zeros(d)},
               paths["projector"])
    (folder / "recipe.json").write_text(recipe)
    return paths


ORIG_CHECK = r"""
import json, sys, transformers, tokenizers, torch, accelerate
import llava.train.train
from llava.model import LlavaLlamaForCausalLM
from transformers import CLIPVisionModel, AutoTokenizer
llm, clip = sys.argv[1], sys.argv[2]
transformers.logging.set_verbosity_error()
_, li = LlavaLlamaForCausalLM.from_pretrained(llm, output_loading_info=True)
_, ci = CLIPVisionModel.from_pretrained(clip, output_loading_info=True)
tok = AutoTokenizer.from_pretrained(llm, use_fast=False, model_max_length=2048, padding_side="right")
print("ORIG_CHECK " + json.dumps(dict(torch=torch.__version__, transformers=transformers.__version__, tokenizers=tokenizers.__version__,
      accelerate=accelerate.__version__, llm_missing=li["missing_keys"], llm_unexpected=li["unexpected_keys"],
      clip_missing=ci["missing_keys"], clip_unexpected=len(ci["unexpected_keys"]), tokenizer=type(tok).__name__, vocab=len(tok),
      legacy=getattr(tok, "legacy", None))))
"""


def original_setup(venv:Path, paths:dict) -> dict:
    """Whether the original can run: the scratch venv exists, imports llava.train.train, has accelerate (installed here,
    at llava-torch's own pin, when missing) and loads both model folders with no missing weights."""
    py = venv / "bin" / "python"
    how = ("create it with `bash tests/parity/make_llava_fixture.sh` (or the pip lines in tests/parity/README.md: "
           f"torch 2.13.0 CPU, transformers 4.37.2, tokenizers 0.15.1, sentencepiece 0.1.99, protobuf, pillow, then "
           f"`pip install --no-deps llava-torch==1.2.2.post1`), or point LLAVA_ORIG_VENV at one; this bench adds {ACCELERATE_PIN}")
    if not py.exists(): return dict(ok=False, reason=f"no scratch venv at {venv} (LLAVA_ORIG_VENV): {how}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    probe = subprocess.run([str(py), "-c", "import llava.train.train, accelerate"], capture_output=True, text=True, env=env)
    installed = []
    if probe.returncode and "accelerate" in probe.stderr:
        print(f"  the scratch venv lacks accelerate (transformers' Trainer needs it): pip install {ACCELERATE_PIN}", flush=True)
        pip = subprocess.run([str(py), "-m", "pip", "install", "-q", ACCELERATE_PIN], capture_output=True, text=True)
        if pip.returncode: return dict(ok=False, reason=f"pip install {ACCELERATE_PIN} into {venv} failed: {pip.stderr.strip()[-300:]}")
        installed.append(ACCELERATE_PIN)
        probe = subprocess.run([str(py), "-c", "import llava.train.train, accelerate"], capture_output=True, text=True, env=env)
    if probe.returncode:
        return dict(ok=False, reason=f"`import llava.train.train` fails in {venv}: {probe.stderr.strip().splitlines()[-1]}; {how}")
    chk = subprocess.run([str(py), "-c", ORIG_CHECK, str(paths["llm"]), str(paths["clip"])], capture_output=True, text=True, env=env)
    lines = [l for l in chk.stdout.splitlines() if l.startswith("ORIG_CHECK ")]
    if chk.returncode or not lines: return dict(ok=False, reason=f"the original cannot load the bench model: {chk.stderr.strip()[-500:]}")
    info = json.loads(lines[-1][len("ORIG_CHECK "):])
    if info["llm_missing"] or info["clip_missing"]:
        return dict(ok=False, reason=f"the original leaves weights uninitialised: {info}")
    return dict(ok=True, venv=str(venv), installed_here=installed, check=info)


def side_flags(paths:dict, data:dict, mode:str, seed:int, steps:int, out:Path) -> list:
    "The flags both sides get: Quilt-LLaVA's stage-2 recipe scaled down (grouped: --group_by_modality_length True)."
    f = ["--model_name_or_path", paths["llm"], "--version", "v1", "--data_path", data["finetune"], "--image_folder", data["media_folder"],
         "--vision_tower", paths["clip"], "--pretrain_mm_mlp_adapter", paths["projector"], "--mm_projector_type", "mlp2x_gelu",
         "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
         "--image_aspect_ratio", "pad", "--group_by_modality_length", str(mode == "grouped"), "--bf16", "False",
         "--output_dir", out, "--num_train_epochs", "1", "--max_steps", steps, "--per_device_train_batch_size", "4",
         "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "1", "--evaluation_strategy", "no",
         "--save_strategy", "no", "--learning_rate", "2e-5", "--weight_decay", "0.", "--warmup_ratio", "0.03",
         "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--model_max_length", "2048", "--dataloader_num_workers", "0",
         "--lazy_preprocess", "True", "--report_to", "none", "--seed", seed]
    return [str(x) for x in f]


def _per_step_original(rec:dict, steps:int, fm) -> list:
    """Per-step counts of an original run from its driver record: wall time, samples, real tokens (each sample's length after
    the media expansion), computed tokens (samples x padded width), model FLOPs (`qllava.modeling.flops.batch_model_flops`'s
    formula: 6 N T + causal attention per sample + each real image through encoder and projector), tower time."""
    out = []
    for k in range(steps):
        b, st = rec["batches"][k], rec["steps"][k]
        s = b["lengths"]
        flops = 6 * fm.llm_matmul * sum(s) + 6 * fm.layers * fm.hidden * sum(x * x for x in s) + fm.media.get("image", 0.0) * b["images_in_text"]
        out.append(dict(step=st["step"], time=st["time"], samples=b["samples"], tokens=sum(s), computed=b["samples"] * b["width"],
                        rows=b["samples"], flops=flops, images_encoded=b["images_encoded"], images_real=b["images_in_text"],
                        tower_seconds=rec["tower"][k]["seconds"]))
    return out


def _per_step_qllava(metrics:list, per_step_samples:int) -> list:
    """Per-step counts of a qllava run from metrics.jsonl: each step's line has its wall time and the run's cumulative
    rates (x / dt since the loop started, dt = samples / samples_per_s), so cumulative x = rate_x / samples_per_s x samples."""
    out, prev = [], dict(samples=0, tokens=0.0, computed=0.0, rows=0.0, flops=0.0)
    for m in metrics:
        n = per_step_samples * m["step"]
        cum = dict(samples=n, tokens=m["tokens_per_s"] / m["samples_per_s"] * n, computed=m["computed_tokens_per_s"] / m["samples_per_s"] * n,
                   rows=m["rows_per_sample"] * n, flops=m.get("model_flops_per_s", 0.0) / m["samples_per_s"] * n)
        out.append(dict(step=m["step"], time=m["time"], **{k: cum[k] - prev[k] for k in cum}))
        prev = cum
    return out


def steady(per_step:list, warmup:int) -> dict:
    "Steady-state rates over steps warmup+1 .. N: counts of those steps over the wall time from the end of step `warmup` to the end of step N."
    w = per_step[warmup:]
    dt = per_step[-1]["time"] - per_step[warmup - 1]["time"]
    tot = {k: sum(s[k] for s in w) for k in ("samples", "tokens", "computed", "rows", "flops")}
    out = dict(timed_steps=len(w), seconds=dt, step_seconds=dt / len(w), samples_per_s=tot["samples"] / dt, tokens_per_s=tot["tokens"] / dt,
               computed_tokens_per_s=tot["computed"] / dt, padding_share=1 - tot["tokens"] / tot["computed"],
               rows_per_sample=tot["rows"] / tot["samples"], model_flops_per_s=tot["flops"] / dt,
               step_times=[round(b["time"] - a["time"], 3) for a, b in zip(per_step[warmup - 1:], per_step[warmup:])],
               samples_per_step=tot["samples"] / len(w))
    out["median_step_seconds"] = statistics.median(out["step_times"])
    if "tower_seconds" in per_step[0]:
        out["tower_seconds_per_step"] = sum(s["tower_seconds"] for s in w) / len(w)
        out["images_encoded_per_step"] = sum(s["images_encoded"] or 0 for s in w) / len(w)
        out["images_real_per_step"] = sum(s["images_real"] for s in w) / len(w)
    return out


def run_side(side:str, mode:str, rep:int, paths:dict, data:dict, args, venv:Path, work:Path, fm) -> dict:
    "One training run of one side and mode in a subprocess; its steady-state numbers (or why it failed)."
    import shutil
    out = work / "runs" / f"{rep}-{side}-{mode}"
    shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
    flags = side_flags(paths, data, mode, args.side_seed + rep, args.side_steps, out)
    # a fresh single process on each side: none of a launcher's rank variables (the step part's process group sets them here)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    if side == "original":
        cmd = [str(venv / "bin" / "python"), str(HERE / "_original_train_driver.py"), str(out / "driver.json"), "--", *flags]
    else:
        cmd = [sys.executable, "-m", "qllava.training.train", *flags, "--deepspeed", "none", *SIDE_MODE_FLAGS.get(mode, [])]
    load0, t0 = os.getloadavg()[0], time.time()
    try:
        with open(out / "log.txt", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=args.side_timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    res = dict(side=side, mode=mode, repeat=rep, seed=args.side_seed + rep, returncode=rc, wall_seconds=round(time.time() - t0, 1),
               loadavg=[round(load0, 2), round(os.getloadavg()[0], 2)], command=" ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd)))
    try:
        if side == "original":
            rec = json.loads((out / "driver.json").read_text())
            per = _per_step_original(rec, args.side_steps, fm)
            res.update(versions=rec["versions"], sampler=rec.get("sampler"), optim=rec.get("optim"), attn_implementation=rec.get("attn_implementation"),
                       tower_dtype=rec["tower"][0]["dtype"], trainable_params=rec.get("trainable_params"),
                       setup_seconds=round(rec["t_train_begin"] - rec["t_start"], 1),
                       losses=[h["loss"] for h in rec["log_history"] if "loss" in h])
        else:
            lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
            per = _per_step_qllava([m for m in lines if "loss" in m], 4)
            summ = json.loads((out / "summary.json").read_text())
            cfg = json.loads((out / "train_config.json").read_text())
            res.update(optim=cfg["optim"], deepspeed=cfg["deepspeed"], packing=cfg["packing"], trainable=summ["trainable"],
                       vocab=summ["tokenizer"]["vocab_size"], run_mfu_logged=summ.get("mfu"),
                       losses=[m["loss"] for m in lines if "loss" in m])
        if len(per) < args.side_steps: raise ValueError(f"{len(per)} of {args.side_steps} steps recorded")
        res.update(steady(per, args.side_warmup))
    except Exception as e:
        tail = (out / "log.txt").read_text()[-1500:] if (out / "log.txt").exists() else ""
        res.update(error=f"{type(e).__name__}: {e}", log_tail=tail)
    for p in list(out.glob("*.safetensors")) + list(out.glob("*.bin")): p.unlink()  # the final weights: not needed, 200 MB each
    return res


def side_flop_model(paths:dict):
    "qllava's `flop_model` of the bench-size model as stage 2 trains it, shared by both sides' model FLOPs (see `batch_model_flops`)."
    from qllava.modeling.model import MediaSetup, Placement, build_model
    from qllava.modeling.flops import flop_model
    from qllava.config import TrainConfig, resolve_config
    from qllava.training.train import apply_stage
    model, tok = build_model(llm=str(paths["llm"]), encoders={"image": str(paths["clip"])}, projector="mlp2x_gelu",
                             media=MediaSetup(select_layer=-2))
    model = apply_stage(model, resolve_config(TrainConfig(stage="finetune")))
    fm = flop_model(model)
    return fm, dict(llm_params=sum(p.numel() for p in model.llm.parameters()), encoder_params=sum(p.numel() for p in model.encoders.parameters()),
                    projector_params=sum(p.numel() for p in model.projectors.parameters()), vocab=len(tok),
                    flop_model=dict(llm_matmul=fm.llm_matmul, layers=fm.layers, hidden=fm.hidden, media_flops_per_image=fm.media.get("image")))


def side_summary(runs:list, peak:float) -> tuple:
    "Per side and mode over the repeats: mean (min-max), best repeat, pooled median step, MFU; and qllava / original ratios."
    table = {}
    for key in SIDE_KEYS:
        side, mode = key.split("/")
        ok = [r for r in runs if r["side"] == side and r["mode"] == mode and "error" not in r]
        if not ok: table[key] = None; continue
        sps = [r["samples_per_s"] for r in ok]
        mean = lambda k: statistics.mean(r[k] for r in ok)
        best = max(ok, key=lambda r: r["samples_per_s"])
        pooled = statistics.median(x for r in ok for x in r["step_times"])  # every steady step of every repeat
        table[key] = dict(runs=len(ok), samples_per_s=statistics.mean(sps), samples_per_s_min=min(sps), samples_per_s_max=max(sps),
                          samples_per_s_std=statistics.stdev(sps) if len(sps) > 1 else 0.0, tokens_per_s=mean("tokens_per_s"),
                          computed_tokens_per_s=mean("computed_tokens_per_s"), padding_share=mean("padding_share"),
                          rows_per_sample=mean("rows_per_sample"), step_seconds=mean("step_seconds"),
                          model_flops_per_s=mean("model_flops_per_s"), mfu=mean("model_flops_per_s") / peak,
                          samples_per_s_best=best["samples_per_s"], best_repeat=best["repeat"], mfu_best=max(r["model_flops_per_s"] for r in ok) / peak,
                          median_step_seconds=pooled, samples_per_s_median=mean("samples_per_step") / pooled)
        if side == "original":
            table[key].update(tower_seconds_per_step=mean("tower_seconds_per_step"), images_encoded_per_step=mean("images_encoded_per_step"),
                              images_real_per_step=mean("images_real_per_step"))
    ratios = {}
    for mode, base in SIDE_BASELINE.items():
        q, o = table.get(f"qllava/{mode}"), table.get(f"original/{base}")
        ratios[mode] = dict(vs=f"original/{base}", **{k: q[k] / o[k] if q and o else None for k in
                            ("samples_per_s", "samples_per_s_best", "samples_per_s_median", "tokens_per_s")})
    return table, ratios


def side_by_side(args) -> dict:
    "The original LLaVA's train() and qllava's on the same model, data and flags, alternating (see the module docstring)."
    from qllava.data.presets import demo_paths
    venv = Path(os.environ.get("LLAVA_ORIG_VENV", ORIG_VENV_DEFAULT))
    work = Path(os.environ.get("QLLAVA_BENCH_ORIG_DIR", SIDE_DIR_DEFAULT))
    t = time.perf_counter()
    paths = side_assets(work / "assets")
    data = demo_paths("pathology")
    data = dict(finetune=data["finetune"], media_folder=data["media_folder"])
    print(f"  model folders in {work / 'assets'} ({time.perf_counter() - t:.0f} s)", flush=True)
    orig = original_setup(venv, paths)
    if not orig["ok"]: print(f"  SKIPPING THE ORIGINAL SIDE: {orig['reason']}", flush=True)
    else: print(f"  original: {venv} ({orig['check']})", flush=True)
    fm, model_info = side_flop_model(paths)
    peaks = [matmul_peak()]
    runs = []
    for rep in range(args.side_repeats):
        for side, mode in SIDE_SCHEDULE:
            if side == "original" and not orig["ok"]: continue
            peaks.append(matmul_peak(repeats=2))  # between runs too: the best of all is this machine's peak, the rest shows the load
            r = run_side(side, mode, rep, paths, data, args, venv, work, fm)
            runs.append(r)
            if "error" in r: print(f"  [{rep + 1}/{args.side_repeats}] {side} {mode}: FAILED ({r['error']})\n{r.get('log_tail', '')}", flush=True)
            else: print(f"  [{rep + 1}/{args.side_repeats}] {side} {mode}: {r['samples_per_s']:.3f} samples/s, {r['tokens_per_s']:.0f} real tokens/s, "
                        f"padding {r['padding_share']:.1%}, step {r['step_seconds']:.2f} s (run {r['wall_seconds']:.0f} s, load {r['loadavg'][0]:.1f}-{r['loadavg'][1]:.1f})", flush=True)
    peaks.append(matmul_peak())
    peak = max(x for p in peaks for x in p["all"])
    table, ratios = side_summary(runs, peak)
    return dict(original=orig, venv=str(venv), work=str(work), assets={k: str(v) for k, v in paths.items()}, data={k: str(v) for k, v in data.items()},
                model=model_info, llm_config=SIDE_LLM, clip_vision_config=SIDE_CLIP["vision_config"], steps=args.side_steps,
                warmup=args.side_warmup, repeats=args.side_repeats, seed=args.side_seed, schedule=[f"{s}/{m}" for s, m in SIDE_SCHEDULE],
                flags=side_flags(paths, data, "random", args.side_seed, args.side_steps, Path("OUT")),
                peak=dict(best=peak, n=2048, measurements=[p["all"] for p in peaks]), runs=runs, table=table, ratios=ratios,
                seconds=round(time.perf_counter() - t, 1))


# ---------------------------------------------------------------- report
def fmt(x, d=0): return f"{x:,.{d}f}"


def md_header(res:dict) -> list:
    m = res["machine"]
    kept = [f"{p} ({res['part_dates'][p]})" for p in PARTS if p not in res["parts_run"] and p in res.get("part_dates", {})]
    return ["# Training benchmark", "",
            f"{m['cpu_model']}, {m['cpus']} CPUs, torch threads {m['torch_threads']}, Python {m['python']}, torch {m['torch']}, "
            f"transformers {m['transformers']}, deepspeed {m['deepspeed']}; qllava at commit {m.get('qllava_commit')}"
            f"{' with uncommitted changes in qllava/' if m.get('qllava_dirty') else ''}; {res['date']}. "
            f"Load average at start / end: {m['loadavg_start'][0]:.1f} / {res['loadavg_end'][0]:.1f} (other processes may share the 2 cores).", "",
            f"Parts run this time: {', '.join(res['parts_run'])}" + (f"; kept from an earlier run: {', '.join(kept)}" if kept else "")
            + f". Command: `python bench/bench_train.py --parts {','.join(res['parts_run'])}`.", ""]


def md_step(res:dict) -> list:
    m, t, f, pk = res["machine"], res["train"], res["flops"], res["peak"]
    st = t["step_seconds"]
    return [f"## Stage-2 training step, bench preset (LLM + projector trainable, encoder frozen; DeepSpeed ZeRO-2, torch AdamW, 1 rank; {res['part_dates']['step']})", "",
            f"Model: bench-vit-b32 tower ({fmt(res['params']['encoder'])} params, frozen) + mlp2x_gelu projector "
            f"({fmt(res['params']['projector'])}) + bench-llama LLM ({fmt(res['params']['llm'])} params with the preset's "
            f"{fmt(res['model']['embedding_rows_used'])}-row vocabulary; {fmt(res['model']['llm_params_as_built'])} as `build_model` "
            f"leaves it with {res['model']['embedding_rows_as_built']} rows).", "",
            "| metric | value |", "|---|---:|",
            f"| batch | {f['B']} samples x {f['L']} tokens ({f['images']} images = {f['media_tokens']} media tokens; {f['tokens_real']} real tokens) |",
            f"| timed steps (after {res.get('args_step', res['args'])['warmup']} warm-up) | {len(t['step_times'])} |",
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
            f"| **achieved / peak** | **{res['mfu']:.1%}** (vs median peak {res['mfu_median']:.1%}; simple 6NT estimate {res['mfu_6nt']:.1%}) |", ""]


def md_flops(res:dict) -> list:
    f = res["flops"]
    return ["## FLOPs formula (the step above)", "",
            "Multiply-add = 2 FLOPs; T = B x L computed tokens (padding is computed); N_llm = the LLM's Linear weights "
            f"({fmt(f['N_llm_matmul'])}: attention, MLP, lm_head; the input embedding is a lookup); N_proj = {fmt(f['N_proj'])}; "
            f"N_enc = {fmt(f['N_enc_matmul'])} (tower Linear + patch conv).", "",
            "- LLM forward: 2 N_llm T + attention 4 L d n_layers T (QK^T and AV over the full L x L); backward = 2 x forward "
            "(activation and weight gradients), so LLM = 3 x forward.",
            "- projector (trainable): 6 N_proj T_media (T_media = images x 49).",
            "- encoder (frozen, forward only): 2 N_enc T_enc + 4 S d_enc n_layers T_enc (T_enc = images x 50, all 12 layers run).",
            "- not counted: norms, activations, softmax, the loss, AdamW (its time is in the step).",
            f"- plain estimate 6 (N_llm + N_proj) T + 2 N_enc T_enc = {f['simple_6NT'] / 1e9:,.1f} GFLOP.", ""]


def md_padding(res:dict) -> list:
    def packed(r, k):
        p = r.get(k)
        return "-" if p is None else f"{p['padding_share']:.1%} ({p['rows_per_sample']:.2f})"
    pd = res.get("padding_data", {})
    lines = [f"## Padding share of computed tokens over one epoch (batch {pd.get('batch', res['args']['batch'])} per rank; {res['part_dates']['padding']})", "",
             "Each row's batches collated three ways: padded (`DataCollator`, one row per sample, to the longest), packed to the "
             "longest sample (`qllava.data.packing.PackingCollator(pad_id)`, the collator's bare default), packed to 2048 tokens "
             "(`PackingCollator(pad_id, 2048)`, as `--packing True` lays rows at --model_max_length 2048). Packed cells: padding "
             "share (rows per sample).", "",
             "| data | ranks | sampler | group_by_modality | megabatch_steps | batches | real tokens | computed tokens (padded) | padding share (padded) | packed, longest | packed, 2048 | mixed-modality batches |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in res["padding"].items():
        for r in rows:
            g = "-" if r["group_by_modality"] is None else str(r["group_by_modality"])
            K = "-" if r["megabatch_steps"] is None else str(r["megabatch_steps"]) + (" (LLaVA)" if r["megabatch_steps"] == 1 else " (default)")
            lines.append(f"| {name} | {r['ranks']} | {r['sampler']} | {g} | {K} | {r['batches']} | {fmt(r['real_tokens'])} | {fmt(r['computed_tokens'])} | "
                         f"{r['padding_share']:.1%} | {packed(r, 'packed_longest')} | {packed(r, 'packed_2048')} | {r['mixed_modality_batches']} |")
    n_demo = pd.get("demo", {})
    lines += ["", f"Data: `demo` = shipped demo pathology finetune.json ({n_demo.get('records', '?')} records, {n_demo.get('text_only', '?')} text-only); "
              f"`synthetic` = {pd.get('synthetic', res['args']['synthetic'])} LLaVA-like records (90% 1 image + 1-8 QA pairs, 10% text-only with 2-16 pairs; "
              "demo sentences). Media tokens (49 per image) count as real tokens. `--group_by_modality_length False` in qllava is "
              "the `False / 8` row (qllava's sampler still sorts by length within megabatches of 8 steps); the original LLaVA's "
              "random batches are the `random batches` row.", ""]
    return lines


def md_side(res:dict) -> list:
    s = res["side_by_side"]
    mi, lc, vc = s["model"], s["llm_config"], s["clip_vision_config"]
    o = s["original"]
    lines = [f"## Side by side: the original LLaVA-1.5 `train()` vs qllava, same model, data and flags (CPU, 1 process; {res['part_dates']['original']})", ""]
    if not o["ok"]:
        lines += [f"**The original side was not run**: {o['reason']}. Only qllava's rows are filled.", ""]
    else:
        v = next((r["versions"] for r in s["runs"] if r["side"] == "original" and "versions" in r), o["check"])
        lines += [f"Original: haotian-liu/LLaVA as released (llava-torch {v.get('llava_torch', '1.2.2.post1')}), its own `llava.train.train.train()` "
                  f"unmodified, in the scratch venv {s['venv']} (torch {v['torch']}, transformers {v['transformers']}, tokenizers {v['tokenizers']}, "
                  f"accelerate {v['accelerate']}" + (f"; {', '.join(o['installed_here'])} installed by this bench" if o.get("installed_here") else "")
                  + "), driven by `bench/_original_train_driver.py`: plain HF Trainer (no --deepspeed), fp32, "
                  "`train()`'s default attention (sdpa; the original scripts' `train_mem.py` asks for flash-attn, CUDA only). The driver only "
                  "observes: a `TrainerCallback` stamping each step's end, a wrapper counting what `prepare_inputs_labels_for_multimodal` "
                  "hands the LLM, and a timer around the vision tower.", ""]
    lines += ["qllava: `python -m qllava.training.train` with the same flags plus `--deepspeed none` (DeepSpeed's engine at ZeRO stage 0 in one "
              "process: the single-process equivalent of the Trainer path); packed: `--packing True` (rows of --model_max_length, "
              "2048 tokens, the default budget with sdpa). qllava's sampler at `--group_by_modality_length "
              "False` still sorts by length within megabatches of 8 steps (modalities mixed), the original's is torch's RandomSampler: "
              "the padding column shows what that is worth.", "",
              f"Model, the same folders for both (`{s['assets']['llm']}`, `{s['assets']['clip']}`, seed {SIDE_SEED}, random weights, fp32): "
              f"a Vicuna-shaped LLaMA ({lc['num_hidden_layers']} layers of {lc['hidden_size']}, MLP {lc['intermediate_size']}, "
              f"{lc['num_attention_heads']} heads, the real LLaMA-2 vocabulary of {lc['vocab_size']:,} with Vicuna v1.5's tokenizer config: "
              f"`qllava/assets/tokenizers/llama2-spm`; {fmt(mi['llm_params'])} parameters in qllava, whose tokenizer gains its media "
              f"placeholders: {mi['vocab']} rows) and a CLIP tower with QuiltNet-B/32's geometry ({vc['image_size']} px, patch {vc['patch_size']}: "
              f"49 tokens per image; {vc['num_hidden_layers']} layers of {vc['hidden_size']}; {fmt(mi['encoder_params'])} parameters, frozen), "
              f"mlp2x_gelu projector ({fmt(mi['projector_params'])}) started from the same stage-1 file (`mm_projector.bin`, "
              "`--pretrain_mm_mlp_adapter`) on both sides.", "",
              f"Data: the shipped demo pathology finetune.json and its images ({s['data']['finetune']}). Flags (Quilt-LLaVA's stage-2 "
              "recipe scaled down: batch 4 instead of 16, no --bf16 / --tf32 / --gradient_checkpointing / --deepspeed on CPU, 0 loader "
              "workers, no saving): `" + " ".join(x if not x.startswith("/") else Path(x).name for x in s["flags"]) + "`; grouped = "
              "`--group_by_modality_length True`. Each side keeps its own default optimiser kernel (`--optim` is not in the recipe): "
              "the original's adamw_torch (foreach), qllava's adamw_torch_fused.", "",
              f"Runs alternate ({' -> '.join(s['schedule'])}, {s['repeats']} times; seed {s['seed']} + repeat on both sides). Each run "
              f"trains {s['steps']} steps; samples/s, tokens/s, padding and MFU are steady-state: the counts of steps {s['warmup'] + 1}-{s['steps']} "
              f"over the wall time from the end of step {s['warmup']} to the end of step {s['steps']} (the original: a TrainerCallback's "
              "`on_step_end` stamps; qllava: the `time` of each step's metrics.jsonl line, written right after the step; per-step "
              "counts of qllava from its cumulative rates). Spread = min-max over the repeats. Other jobs share this machine's 2 "
              "cores and come and go within a run (see the load averages and the per-run table), so two figures less sensitive to "
              "them are given beside the mean: the best repeat, and samples per step over the median of every steady step of every "
              "repeat (contention stretches some steps; the median ignores them while they are fewer than half).", "",
              "| batching | side | samples/s: mean (min-max) | best repeat | from median step (s) | real tokens/s | computed tokens/s | padding share | rows / sample | MFU: mean (best) | **qllava / original: mean; best; median** |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    labels = {"random": "random (Quilt's flags)", "grouped": "grouped",
              "packed2048": "packed: `--packing True`, rows <= 2048 tokens (vs the original's random)"}
    x_ = lambda v: "n/a" if v is None else f"{v:.2f}x"
    for key in SIDE_KEYS:
        side, mode = key.split("/")
        t = s["table"].get(key)
        ra = s["ratios"].get(mode, {})
        if side == "original": rtxt = "-"
        elif ra.get("samples_per_s") is None: rtxt = "n/a (original not run)"
        else: rtxt = f"**{x_(ra['samples_per_s'])}**; {x_(ra.get('samples_per_s_best'))}; {x_(ra.get('samples_per_s_median'))}"
        if t is None:
            lines.append(f"| {labels[mode]} | {side} | not run | | | | | | | | {rtxt} |"); continue
        lines.append(f"| {labels[mode]} | {side} | {t['samples_per_s']:.3f} ({t['samples_per_s_min']:.3f}-{t['samples_per_s_max']:.3f}) | "
                     f"{t['samples_per_s_best']:.3f} | {t['samples_per_s_median']:.3f} ({t['median_step_seconds']:.2f}) | {fmt(t['tokens_per_s'])} | "
                     f"{fmt(t['computed_tokens_per_s'])} | {t['padding_share']:.1%} | {t['rows_per_sample']:.2f} | {t['mfu']:.1%} ({t['mfu_best']:.1%}) | {rtxt} |")
    ra = s["ratios"].get("random", {})
    lines += ["", f"MFU = model FLOP/s / this machine's fp32 matmul peak ({s['peak']['best'] / 1e9:,.0f} GFLOP/s, best 2048^3 `torch.matmul` "
              "measured in the bench process before, between and after the runs). Model FLOPs are `qllava.modeling.flops.batch_model_flops`'s for both "
              f"sides (6 N T over real tokens, N = {fmt(mi['flop_model']['llm_matmul'])} LLM matmul weights, + causal attention per sample "
              f"+ {mi['flop_model']['media_flops_per_image'] / 1e9:.2f} GFLOP per real image through tower and projector): useful work only, "
              "so padding, the original's zero images for text-only samples and its extra padded positions count as no work.", ""]
    if ra.get("samples_per_s") is not None:
        vals = [ra["samples_per_s"], ra["samples_per_s_best"], ra["samples_per_s_median"]]
        lines += [f"**At Quilt's flags (random batches) qllava trains {x_(vals[0])} the original's samples/s** (mean of the repeats; best "
                  f"repeats {x_(vals[1])}, median steps {x_(vals[2])}). Target >= 2.5x: "
                  f"{'met' if min(vals) >= 2.5 else 'met by some figures only' if max(vals) >= 2.5 else 'NOT met'}.", ""]
        o, q = s["table"]["original/random"], s["table"]["qllava/random"]
        lines += [f"Both sides train the same records (in different orders), so about the same model FLOPs per sample, and the ratio of "
                  f"samples/s is about the ratio of MFU: the original's best repeat already reaches {o['mfu_best']:.1%} of the fp32 matmul "
                  f"peak (qllava's {q['mfu_best']:.1%}), so 2.5x at this "
                  f"model size on this CPU would need qllava at {2.5 * o['mfu_best']:.0%} of peak{' (beyond the peak itself)' if 2.5 * o['mfu_best'] >= 1 else ''}; what is left to win here is padding, "
                  "the original's float16 tower (below) and per-step overhead, not a different amount of arithmetic.", ""]
    ot = s["table"].get("original/random")
    if ot:
        lines += [f"Where the original's time goes, beyond padding: `train()` moves the vision tower to float16 whenever --bf16 is off "
                  f"(`vision_tower.to(dtype=torch.bfloat16 if training_args.bf16 else torch.float16)`), CPU included: its forward took "
                  f"{ot['tower_seconds_per_step']:.2f} s of the {ot['step_seconds']:.2f} s step here (random batches), and it encodes "
                  f"{ot['images_encoded_per_step']:.1f} images per step for {ot['images_real_per_step']:.1f} real ones (a zero image stands in "
                  "for each text-only sample).", ""]
    lines += ["Every run:", "", "| repeat | side | batching | samples/s | step (s): mean, median | real tokens/s | padding | MFU | load avg (start-end) | run wall (s) |",
              "|---:|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for x in s["runs"]:
        if "error" in x:
            lines.append(f"| {x['repeat'] + 1} | {x['side']} | {x['mode']} | failed: {x['error'][:120]} | | | | | | {x['wall_seconds']:.0f} |"); continue
        lines.append(f"| {x['repeat'] + 1} | {x['side']} | {x['mode']} | {x['samples_per_s']:.3f} | {x['step_seconds']:.2f}, {x['median_step_seconds']:.2f} | {fmt(x['tokens_per_s'])} | "
                     f"{x['padding_share']:.1%} | {x['model_flops_per_s'] / s['peak']['best']:.1%} | {x['loadavg'][0]:.1f}-{x['loadavg'][1]:.1f} | {x['wall_seconds']:.0f} |")
    lines += ["", f"Side-by-side part: {s['seconds']:.0f} s. Rerun it alone: `python bench/bench_train.py --parts original` "
              "(LLAVA_ORIG_VENV names the scratch venv, default /tmp/llava-orig-venv; QLLAVA_BENCH_ORIG_DIR the folder of the model "
              "and the runs, default /tmp/qllava-bench-train-orig).", ""]
    return lines


def markdown(res:dict) -> str:
    lines = md_header(res)
    if "side_by_side" in res: lines += md_side(res)
    if "train" in res: lines += md_step(res)
    if "padding" in res: lines += md_padding(res)
    if "flops" in res: lines += md_flops(res)
    lines.append(f"Total run time {res['run_seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


PARTS = ("padding", "original", "step")  # the order they run in


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run, of {', '.join(PARTS)} (original = the side-by-side "
                    "with the original LLaVA's train()); the results of parts not run are kept from the existing train.json")
    ap.add_argument("--steps", type=int, default=6, help="step part: timed training steps (at most)")
    ap.add_argument("--warmup", type=int, default=1, help="step part: untimed warm-up steps")
    ap.add_argument("--budget", type=float, default=120.0, help="step part: stop timing (after at least 3 steps) once the timed steps took this many seconds")
    ap.add_argument("--batch", type=int, default=4, help="step and padding parts: samples per step")
    ap.add_argument("--synthetic", type=int, default=2000, help="padding part: records of the synthetic LLaVA-like set")
    ap.add_argument("--side-steps", type=int, default=16, help="original part: training steps per run")
    ap.add_argument("--side-warmup", type=int, default=5, help="original part: first steps left out of the steady-state numbers")
    ap.add_argument("--side-repeats", type=int, default=2, help="original part: times the alternating schedule runs")
    ap.add_argument("--side-seed", type=int, default=42, help="original part: seed of the first repeat (+1 per repeat), both sides")
    ap.add_argument("--side-timeout", type=int, default=600, help="original part: seconds before a run is stopped")
    ap.add_argument("--out", default=str(HERE / "results"), help="results folder")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := [p for p in parts if p not in PARTS]: ap.error(f"unknown part(s) {unknown}: use {', '.join(PARTS)}")
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()
    torch.manual_seed(0)
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res = {}
    if set(parts) != set(PARTS) and (out / "train.json").is_file():  # keep the other parts' results
        old = json.loads((out / "train.json").read_text())
        keep = {"padding": ("padding", "padding_seconds", "padding_data"), "original": ("side_by_side",),
                "step": ("train", "flops", "peak", "model", "params", "samples_per_s", "tokens_per_s", "computed_tokens_per_s", "achieved_flops",
                         "mfu", "mfu_median", "mfu_6nt", "flops_per_cpu_second", "cpu_efficiency", "unloaded_bound")}
        dates = old.get("part_dates") or {p: old.get("date") for p in PARTS if keep[p][0] in old}
        for p in PARTS:
            if p not in parts and keep[p][0] in old:
                res.update({k: old[k] for k in keep[p] if k in old}); res.setdefault("part_dates", {})[p] = dates.get(p, old.get("date"))
                if p == "step": res["args_step"] = old.get("args_step", old.get("args"))
    res.update(date=now, args=vars(args), machine=machine_info(), parts_run=[p for p in PARTS if p in parts])
    res.setdefault("part_dates", {}).update({p: now for p in parts})
    if "step" in parts: res["args_step"] = vars(args)
    print(f"machine: {res['machine']['cpu_model']}, {res['machine']['cpus']} CPUs, torch threads {res['machine']['torch_threads']}, "
          f"load {res['machine']['loadavg_start'][0]:.1f}; parts {', '.join(res['parts_run'])}", flush=True)

    model = tok = None
    if "padding" in parts or "step" in parts:
        print("building the bench model...", flush=True)
        model, tok, info = build_bench_model()
        n_tok = model.config.encoder_num_tokens["image"]

    if "padding" in parts:
        print("padding over one epoch...", flush=True)
        t = time.perf_counter()
        demo = demo_records()
        res["padding"] = {"demo": padding_bench(make_dataset(demo, tok, n_tok), args.batch),
                          "synthetic": padding_bench(make_dataset(synthetic_records(args.synthetic), tok, n_tok), args.batch)}
        res["padding_data"] = {"demo": dict(records=len(demo), text_only=sum("image" not in r for r in demo)), "batch": args.batch,
                               "synthetic": args.synthetic}
        res["padding_seconds"] = round(time.perf_counter() - t, 1)

    if "original" in parts:
        print("side by side with the original LLaVA's train()...", flush=True)
        res["side_by_side"] = side_by_side(args)

    if "step" in parts:
        res["model"] = info
        res["params"] = {p: sum(x.numel() for x in getattr(model, p).parameters()) for p in ("llm", "encoders", "projectors")}
        res["params"] = dict(llm=res["params"]["llm"], encoder=res["params"]["encoders"], projector=res["params"]["projectors"])
        print("fp32 matmul peak (before)...", flush=True)
        peak0 = matmul_peak()
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
