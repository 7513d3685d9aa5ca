"""The prepared GPU check: qllava's own training and answering code at the real Quilt-LLaVA shapes, on one GPU.

Random weights with the exact shapes of Vicuna-7B v1.5 (hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32,000
plus the <image> / <sensor> rows qllava adds) and of the QuiltNet-B-32 / CLIP ViT-B/32 image tower (224 px, patch 32:
49 patch tokens, width 768, 12 layers), mlp2x_gelu projector, all built by `qllava.modeling.model.build_model` directly in
bf16 on the GPU (preset JSON files written to a temporary folder; `torch.device` context, never fp32 first).
Training phases use `qllava.config.resolve_config` / `apply_stage` / `param_groups` (the published stage presets) and
a plain torch loop (fused AdamW on CUDA, grad clipping 1.0, bf16 weights; no DeepSpeed on one GPU); batches are
planned by `qllava.data.dataset.ModalityLengthGroupedSampler` and collated by `qllava.data.dataset.DataCollator`, from
sample lengths drawn with a fixed seed from a Quilt-like distribution (see `draw_lengths`).

Phases (each one a row; an OOM, a missing optional library or the time budget gives a "skipped: why" row instead):
  peak      8192^3 bf16 matmul FLOP/s of this GPU (the MFU denominator), before and after the phases
  stage1    projector only (`pretrain` preset), batch 32, captions
  lora      stage 2, LoRA r128 / alpha 256 on every linear layer of the LLM, gradient checkpointing, batch 16
  full      stage 2, full LLM + projector, gradient checkpointing, batch 16
  full_packed  the same batches packed as `--packing` lays them (`qllava.data.packing.row_budget`): sdpa rows of
            max_length, flash-attn one row per batch for its varlen kernel; lora_packed on request
            (stage1 / lora / full once per attention implementation: sdpa, and flash_attention_2 when flash_attn imports)
  answers   32 prompts answered greedily by `qllava.modeling.generate.answer_batch` one at a time vs in one batch of 32;
            answers/s both ways and whether the answers are identical (reported, never asserted)
  qlora     stage 2 LoRA on a 4-bit NF4 base (bitsandbytes Linear4bit), when bitsandbytes imports and CUDA is there

Figures: samples/s, tokens/s (non-pad), model FLOPs per token (formulas in `step_flops`, printed with the results),
MFU = achieved model FLOP/s / measured matmul peak, HFU (with the gradient-checkpointing recompute), peak memory
(torch.cuda.max_memory_allocated). Writes bench/results/gpu.json + gpu.md (--smoke: gpu_smoke.json + .md, never gpu.*).

    python bench/gpu_check.py                 # on a GPU machine: the real shapes, under 8 minutes on one H200
    python bench/gpu_check.py --smoke         # the same code on CPU at a tiny shape (run by tests/test_gpu_check.py)

Compatibility: only torch (>= 2.0: `torch.device` as a context manager, fused AdamW), transformers and peft are required;
flash_attn / bitsandbytes are optional and detected. The script makes no transformers call whose spelling changed
between versions (`dtype=` vs `torch_dtype=` and the like): models come from qllava's `build_model`, so the
transformers qllava needs is the floor (5.20: qllava.modeling.model imports `SubConfigSpec`); an older one is reported as a
"not run" result with the fix, not a traceback. OOM is caught as `torch.cuda.OutOfMemoryError` where torch has it
(1.13+), else by its message.
"""
from __future__ import annotations
import argparse, contextlib, gc, importlib, importlib.metadata, importlib.util, json, math, os, platform, statistics
import subprocess, sys, tempfile, time, traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # runs from a plain checkout too (no `pip install -e .` needed where the deps are there)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

IGNORE = -100
OOM = getattr(torch.cuda, "OutOfMemoryError", None)  # torch >= 1.13; older torch raises a RuntimeError saying so


def is_oom(e:BaseException) -> bool:
    return (OOM is not None and isinstance(e, OOM)) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())
GRACE_S = 15  # a phase running past the budget by this much stops early and reports the steps it timed
PACKAGES = ["torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "flash-attn", "bitsandbytes",
            "deepspeed", "open_clip_torch", "sentencepiece", "numpy"]
TARGETS = {"stage1_samples_per_s": 50.0, "lora_mfu": 0.40, "full_mfu": 0.35}  # one H200, bf16
ANCHORS = ["Quilt-LLaVA stage 1: ~5 samples/s per A100 (reported)", "LLaVA-1.5-7B stage 2: ~2.3 samples/s per A100 (reported)"]

# ---------------------------------------------------------------- shapes
# Vicuna-7B v1.5's config.json (a LLaMA-2-7B): the values that set the FLOPs and memory
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 hidden_act="silu", initializer_range=0.02, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
# QuiltNet-B-32 = open_clip ViT-B-32 image tower, here as the equivalent transformers CLIPVisionModel
VIT_B32 = dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5)
SHAPES = {
    "gpu": dict(llm=VICUNA_7B, vision=VIT_B32, tokenizer="llama2-spm", max_length=2048,
                # stage 2: text tokens ~ 150 + 550 * Beta(2, 2.2) (150..700, mean ~410) + 49 image tokens; stage 1 captions 60..120
                text=(150, 550, 2.0, 2.2), caption=(60, 120), system=35, question=(10, 40),
                batch1=32, batch2=16, lora_r=128, lora_alpha=256, warmup=2, steps=6, answers=32, max_new=64,
                matmul_n=8192, matmul_warm_s=2.0, budget=450),
    "smoke": dict(llm=dict(VICUNA_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=1200, max_position_embeddings=512, pad_token_id=3),
                  vision=dict(VIT_B32, image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2),
                  tokenizer="llama-demo", max_length=256, text=(20, 60, 2.0, 2.2), caption=(8, 16), system=6, question=(3, 8),
                  batch1=8, batch2=4, lora_r=8, lora_alpha=16, warmup=1, steps=2, answers=8, max_new=8,
                  matmul_n=512, matmul_warm_s=0.2, budget=120),
}


# ---------------------------------------------------------------- environment
def _version(name:str) -> str|None:
    try: return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError: return None


def importable(module:str) -> tuple[bool, str]:
    "(imports, why not): an installed package can still fail to import (ABI mismatch, no CUDA)."
    if importlib.util.find_spec(module) is None: return False, f"{module} is not installed"
    try: importlib.import_module(module); return True, ""
    except Exception as e: return False, f"{module} is installed but does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def environment(device:str) -> dict:
    env = dict(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count(),
               torch_threads=torch.get_num_threads(), versions={p: _version(p) for p in PACKAGES},
               cuda_runtime=torch.version.cuda, device=device, argv=sys.argv[1:])
    try: env["loadavg"] = os.getloadavg()
    except OSError: pass
    try: env["qllava_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                               text=True, timeout=10).stdout.strip() or None
    except Exception: env["qllava_commit"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gb=round(p.total_memory / 2**30, 1),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))), sms=p.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
        try: env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip() or None
        except Exception: env["driver"] = None
    else:
        cpu = None
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"): cpu = line.split(":", 1)[1].strip(); break
        except OSError: pass
        env["cpu_model"] = cpu
    return env


def sync(device:str):
    if device == "cuda": torch.cuda.synchronize()


def matmul_peak(device:str, dtype, n:int, reps:int=20, warm_s:float=1.0) -> dict:
    "FLOP/s of back-to-back n x n x n matmuls on random data (the MFU denominator): best of 3 rounds of `reps`, after `warm_s` of warm-up."
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g); b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t = time.perf_counter()
    while time.perf_counter() - t < warm_s:  # clocks up, cuBLAS heuristics chosen
        torch.matmul(a, b, out=c); sync(device)
    rates = []
    for _ in range(3):
        sync(device); t = time.perf_counter()
        for _ in range(reps): torch.matmul(a, b, out=c)
        sync(device); rates.append(2 * n ** 3 * reps / (time.perf_counter() - t))
    del a, b, c
    return dict(n=n, dtype=str(dtype).replace("torch.", ""), flops=max(rates), all=[round(r / 1e12, 3) for r in rates])


# ---------------------------------------------------------------- model
def write_presets(folder:Path, shapes:dict) -> tuple[str, str]:
    "Preset JSON files that `build_model` reads like the shipped ones (`preset:/path/file.json`)."
    llm, vit = folder / "llm.json", folder / "vision.json"
    llm.write_text(json.dumps({"name": "gpu-check-llm", "kind": "llama", "config": shapes["llm"]}))
    v = shapes["vision"]
    vit.write_text(json.dumps({"name": "gpu-check-vision", "kind": "clip_vision", "config": v, "seed": 0,
                               "preprocessing": {"image_size": v["image_size"]}}))
    return f"preset:{llm}", f"preset:{vit}"


def build(ctx:dict, attn:str):
    "A fresh QllavaForCausalLM + tokenizer, made by qllava.modeling.model.build_model directly on the device in the run dtype."
    from qllava.modeling.model import Placement, build_model
    dev, dtype = ctx["device"], ctx["dtype"]
    t = time.perf_counter()
    with (torch.device(dev) if dev != "cpu" else contextlib.nullcontext()):  # parameters are created on the GPU
        model, tok = build_model(ctx["llm_spec"], {"image": ctx["vision_spec"]}, projector="mlp2x_gelu",
                                 tokenizer=ctx["shapes"]["tokenizer"], seed=0, template="vicuna_v1",
                                 placement=Placement(dtype if dtype != torch.float32 else None, attn))
    # the LLM is already in `dtype`; cast only the tower and the projector (a whole-model .to() would also round
    # the LLM's fp32 rotary inv_freq buffer)
    model.encoders.to(device=dev, dtype=dtype); model.projectors.to(device=dev, dtype=dtype); model.llm.to(dev)
    sync(dev)
    ctx.setdefault("build_s", []).append(round(time.perf_counter() - t, 2))
    return model, tok


def _linear_weights(module:nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def param_counts(model) -> dict:
    "The counts the FLOP formulas use (taken before LoRA / quantisation change the modules)."
    llm, enc = model.llm, model.encoders["image"]
    c = enc.tower.config
    return dict(llm_total=sum(p.numel() for p in llm.parameters()),
                llm_matmul=_linear_weights(llm),  # every linear of the LLM incl. lm_head; the embedding lookup is no matmul
                llm_layers_matmul=_linear_weights(llm) - llm.get_output_embeddings().weight.numel(),
                projector=_linear_weights(model.projectors), encoder_matmul=_linear_weights(enc),
                encoder_total=sum(p.numel() for p in enc.parameters()),
                encoder_tokens=(c.image_size // c.patch_size) ** 2 + 1, encoder_layers=c.num_hidden_layers,
                encoder_width=c.hidden_size, layers=llm.config.num_hidden_layers, hidden=llm.config.hidden_size,
                vocab_rows=llm.get_input_embeddings().weight.shape[0], image_tokens=enc.num_tokens)


FORMULAS = {
    "stage1": "4*N_llm*T (frozen LLM: forward + backward to its inputs, no weight gradients) + 3*A + 6*N_proj*T_img + E",
    "lora": "4*N_llm*T (frozen base) + 6*N_lora*T (adapters) + 3*A + 6*N_proj*T_img + E",
    "qlora": "as lora (dequantisation is not counted as model FLOPs)",
    "full": "6*N_llm*T + 3*A + 6*N_proj*T_img + E",
    "terms": "T = non-pad tokens of the step; N_llm = LLM matmul weights incl. lm_head (no embedding lookup); "
             "A = sum over samples of 2*layers*hidden*s^2 (causal attention forward: QK^T and AV over s^2/2 pairs, "
             "backward = 2x forward); N_proj = projector weights, T_img = image tokens; E = encoder forward "
             "(frozen) = images*(2*N_enc*(P+1) + 2*layers_enc*width_enc*(P+1)^2); HFU adds the gradient-checkpointing "
             "recompute: 2*N_layers*T + A (+ 2*N_lora*T)",
}


def step_flops(kind:str, lens:list, n_images:int, pc:dict, n_lora:int=0, gc:bool=False) -> tuple[float, float]:
    "(model FLOPs, hardware FLOPs) of one training step over samples of real lengths `lens` (formulas in FORMULAS)."
    T = sum(lens)
    A = sum(2 * pc["layers"] * pc["hidden"] * s * s for s in lens)
    P1 = pc["encoder_tokens"]
    E = n_images * (2 * pc["encoder_matmul"] * P1 + 2 * pc["encoder_layers"] * pc["encoder_width"] * P1 * P1)
    proj = 6 * pc["projector"] * pc["image_tokens"] * n_images
    if kind == "full": llm = 6 * pc["llm_matmul"] * T
    elif kind == "stage1": llm = 4 * pc["llm_matmul"] * T
    else: llm = 4 * pc["llm_matmul"] * T + 6 * n_lora * T
    model = llm + 3 * A + proj + E
    hw = model + ((2 * pc["llm_layers_matmul"] * T + A + 2 * n_lora * T) if gc else 0)
    return float(model), float(hw)


# ---------------------------------------------------------------- data
def draw_lengths(kind:str, n:int, shapes:dict, image_tokens:int, seed:int) -> list:
    "Total tokens per sample (image block included): stage 1 captions uniform, stage 2 a Beta-shaped Quilt-like mix."
    rng = np.random.default_rng(seed)
    if kind == "stage1":
        lo, hi = shapes["caption"]
        text = rng.integers(lo, hi + 1, n) + 2  # <s> + caption + "\n" (the `plain` template)
    else:
        lo, span, a, b = shapes["text"]
        text = (lo + span * rng.beta(a, b, n)).round().astype(int)
    return np.minimum(text + image_tokens, shapes["max_length"]).tolist()


def make_sample(i:int, total:int, kind:str, ctx:dict, tok) -> dict:
    "One tokenised, image-expanded sample of `total` tokens with the labels the stage supervises (random ids, seeded by i)."
    g = torch.Generator().manual_seed(1000 + i)
    sh, N, mid = ctx["shapes"], ctx["pc"]["image_tokens"], ctx["media_id"]
    n_text = total - N
    ids = torch.randint(4, ctx["text_vocab"], (n_text,), generator=g)
    ids[0] = tok.bos_token_id
    if kind == "stage1":  # <s> <image>x N caption \n : the caption is supervised
        head, masked = 1, 1
    else:  # <s> system USER: <image>x N question ASSISTANT: | answer </s> ...: the answer is supervised
        head = min(sh["system"], n_text // 3)
        q = int(torch.randint(sh["question"][0], sh["question"][1] + 1, (1,), generator=g))
        masked = min(head + q, n_text - 1)
    full = torch.cat([ids[:head], torch.full((N,), mid), ids[head:]])
    labels = full.clone(); labels[:N + masked] = IGNORE
    img = torch.randn(1, *ctx["image_shape"], generator=g)
    return {"input_ids": full, "labels": labels, "images": img}


def plan_batches(kind:str, ctx:dict, tok, batch:int, n_steps:int, packed:str|None=None) -> list:
    """The first `n_steps` collated batches of qllava's length-grouped sampler over a seeded pool of samples
    (`packed` = the attention implementation: the same samples in `PackingCollator` rows as `qllava.training.train` lays them)."""
    from qllava.data.dataset import DataCollator, ModalityLengthGroupedSampler
    from qllava.data.packing import PackingCollator, row_budget
    pool = batch * max(64, n_steps)
    lens = draw_lengths(kind, pool, ctx["shapes"], ctx["pc"]["image_tokens"], seed={"stage1": 1}.get(kind, 2))
    sampler = ModalityLengthGroupedSampler(lens, batch_size=batch, num_replicas=1, rank=0, seed=0,
                                           group_by_modality=False, modalities=["image"] * pool)
    budget = packed and row_budget(packed, None, batch, ctx["shapes"]["max_length"])
    coll = PackingCollator(tok.pad_token_id, budget) if packed else DataCollator(tok.pad_token_id)
    out = []
    for idx in sampler.batches(0)[:n_steps]:
        b = coll([make_sample(i, lens[i], kind, ctx, tok) for i in idx])
        b["_lens"] = [lens[i] for i in idx]
        out.append(b)
    return out


# ---------------------------------------------------------------- training phases
class Skip(Exception):
    "A phase that cannot run here (missing optional library, no CUDA, time budget)."


def peak_memory(device:str) -> float:
    if device == "cuda": return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (CPU smoke)


def free(device:str):
    gc.collect()
    if device == "cuda": torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()


def quantize_4bit(llm, dtype):
    """Replace the LLM's linear layers (not lm_head) by bitsandbytes NF4 Linear4bit with double quantisation, in place.
    Done here because these random weights have no folder: qllava's `--bits 4` quantises as transformers loads a hub id or
    folder (`BitsAndBytesConfig`, `train.quantization_config`), the same NF4 + double quantisation."""
    import bitsandbytes as bnb
    for name, mod in list(llm.named_modules()):
        for cname, child in list(mod.named_children()):
            if type(child) is nn.Linear and cname != "lm_head":
                with torch.device("meta"):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4").to(child.weight.device)  # .to() quantises
                if child.bias is not None: q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(mod, cname, q)
    return llm


def train_phase(kind:str, attn:str, ctx:dict, batch:int) -> dict:
    "Build, apply the stage, plan the batches, warm up, time the steps; returns the row (`KIND_packed`: packed batches)."
    import dataclasses
    packed, kind = kind.endswith("_packed"), kind.removesuffix("_packed")
    from qllava.config import TrainConfig, resolve_config
    from qllava.training.train import apply_stage, param_groups
    dev, dtype, sh = ctx["device"], ctx["dtype"], ctx["shapes"]
    stage = {"stage1": "pretrain", "lora": "lora", "full": "finetune", "qlora": "qlora"}[kind]
    gc_on = kind != "stage1"  # the published stage-2 scripts checkpoint; qllava's apply_stage ignores it for pretrain
    cfg = resolve_config(TrainConfig(stage=stage, gradient_checkpointing=gc_on, model_max_length=sh["max_length"]))
    if kind in ("lora", "qlora"): cfg = dataclasses.replace(cfg, lora_r=sh["lora_r"], lora_alpha=sh["lora_alpha"])
    if kind == "qlora":
        if dev != "cuda": raise Skip("QLoRA needs CUDA (bitsandbytes 4-bit kernels)")
        ok, why = importable("bitsandbytes")
        if not ok: raise Skip(why)
    model, tok = build(ctx, attn)
    ctx.setdefault("pc", param_counts(model))
    ctx["media_id"], ctx["text_vocab"] = model.config.media_token_ids["image"], tok.vocab_size
    ctx["image_shape"] = model.encoders["image"].input_shape
    if kind == "qlora": quantize_4bit(model.llm, dtype)
    model = apply_stage(model, cfg)
    if dtype != torch.float32:  # peft keeps adapters in fp32; qllava's DeepSpeed bf16 engine casts them to bf16, so do the same
        for p in model.parameters():
            if p.dtype == torch.float32: p.data = p.data.to(dtype)
    model.train()
    n_lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                            **({"fused": True} if dev == "cuda" else {}))
    params = [p for g in groups for p in g["params"]]
    W, S = ctx["warmup"], ctx["steps"]
    batches = plan_batches(kind, ctx, tok, batch, W + S, attn if packed else None)
    times, losses, toks, lens_all, padded, rows, note = [], [], 0, [], 0, 0, None
    mflops = hflops = 0.0
    free(dev)
    for k, b in enumerate(batches):
        lens = b.pop("_lens")
        sync(dev); t0 = time.perf_counter()
        b = {key: v.to(dev, non_blocking=True) for key, v in b.items()}
        out = model(**b)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step(); opt.zero_grad(set_to_none=True)
        sync(dev); dt = time.perf_counter() - t0
        if k >= W:
            times.append(dt); losses.append(float(out.loss.detach())); toks += int(b["attention_mask"].sum())
            padded += b["input_ids"].numel(); lens_all += lens; rows += b["input_ids"].shape[0]
            m, h = step_flops(kind, lens, b["images"].shape[0], ctx["pc"], n_lora, gc_on)
            mflops += m; hflops += h
        del out, b
        if k >= W and k < len(batches) - 1 and time.monotonic() > ctx["deadline"] + GRACE_S:
            note = f"cut to {len(times)} timed steps by the time budget"; break
    S = len(times)
    if toks != sum(lens_all): raise RuntimeError(f"token count mismatch: mask {toks} vs lengths {sum(lens_all)}")
    total = sum(times)
    peak = ctx["peak"]["flops"]
    row = dict(phase=kind + ("_packed" if packed else ""), attn=attn, status="ok", stage=stage, batch=batch, warmup=W, steps=S,
               packed=packed, rows_per_step=round(rows / S, 2),
               gradient_checkpointing=gc_on, trainable_params=trainable, lora_params=n_lora,
               step_s_mean=round(total / S, 4), step_s_std=round(statistics.pstdev(times), 4), step_s_min=round(min(times), 4),
               samples_per_s=round(S * batch / total, 3), tokens_per_s=round(toks / total, 1),
               tokens_per_step=round(toks / S, 1), mean_len=round(toks / (S * batch), 1),
               padding_share=round(1 - toks / padded, 4),
               model_flops_per_token=round(mflops / toks), flops_per_token_6N=6 * ctx["pc"]["llm_total"],
               model_tflops=round(mflops / total / 1e12, 3), achieved_flops=mflops / total, mfu=round(mflops / total / peak, 4),
               hfu=round(hflops / total / peak, 4), hardware_flops=hflops / total, peak_mem_gb=round(peak_memory(dev), 2),
               loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4), formula=FORMULAS[kind])
    if note: row["note"] = note
    del model, opt, params, groups, batches
    return row


# ---------------------------------------------------------------- answering
QUESTIONS = ["What type of tissue is shown in this image?", "Describe the histological features you see.",
             "Is there evidence of malignancy? Answer yes or no.", "What staining technique was used?",
             "Which cells dominate this field?", "Describe the image in detail, including stains, structures and any abnormality.",
             "Is necrosis present?", "What is the most likely diagnosis?"]


def answers_phase(ctx:dict) -> dict:
    "32 prompts (one image each) answered greedily one at a time and in one batch by qllava.modeling.generate.answer_batch."
    from qllava.data.conversation import generation_prompt
    from qllava.modeling.generate import answer_batch, Decoding
    dev, n, max_new = ctx["device"], ctx["shapes"]["answers"], ctx["shapes"]["max_new"]
    model, tok = build(ctx, None)  # qllava's default attention: flash_attention_2 when importable on CUDA, else sdpa
    model.eval()
    g = torch.Generator().manual_seed(7)
    prompts = [generation_prompt("vicuna_v1", "<image>\n" + QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]
    media = [torch.randn(*model.encoders["image"].input_shape, generator=g) for _ in range(n)]
    free(dev)
    answer_batch(model, tok, prompts[:2], media[:2], Decoding(max_new_tokens=max_new, batch_size=2))  # warm-up
    sync(dev); t = time.perf_counter()
    batched = answer_batch(model, tok, prompts, media, Decoding(max_new_tokens=max_new, batch_size=n))
    sync(dev); tb = time.perf_counter() - t
    single, t = [], time.perf_counter()
    for p, m in zip(prompts, media):  # one at a time (what batch_size=1 does), watching the time budget
        single += answer_batch(model, tok, [p], [m], Decoding(max_new_tokens=max_new, batch_size=1))
        if len(single) < n and time.monotonic() > ctx["deadline"] + GRACE_S: break
    sync(dev); t1 = time.perf_counter() - t
    k = len(single)
    diff = [i for i, (a, b) in enumerate(zip(single, batched)) if a != b]
    new_tokens = sum(len(tok(a, add_special_tokens=False).input_ids) for a in batched)
    row = dict(phase="answers", attn=model.llm.config._attn_implementation, status="ok", prompts=n, max_new_tokens=max_new,
               batch1_s=round(t1 * n / k, 3), batched_s=round(tb, 3), batch1_answers_per_s=round(k / t1, 3),
               batched_answers_per_s=round(n / tb, 3), speedup=round(t1 * n / k / tb, 2), compared=k, identical_answers=not diff,
               n_different=len(diff), new_tokens_batched=new_tokens, peak_mem_gb=round(peak_memory(dev), 2),
               example=dict(prompt=prompts[0][-80:], answer=batched[0][:120]))
    if k < n: row["note"] = f"the time budget stopped the one-at-a-time answers after {k} of {n}; batch-1 time scaled to {n}"
    if diff:
        i = diff[0]
        common = len(os.path.commonprefix([single[i], batched[i]]))
        row["first_difference"] = dict(prompt=i, common_prefix_chars=common, batch1=single[i][:120], batched=batched[i][:120])
    del model
    return row


def vllm_phase(ctx:dict) -> dict:
    "The model exported to transformers' Llava (`qllava export-hf`) served by vLLM: greedy answers vs qllava's (opt-in)."
    ok, why = importable("vllm")
    if not ok: raise Skip(f"{why}: install vllm on the GPU node to check exports there")
    from PIL import Image
    from qllava.modeling.checkpoint import export_hf
    from qllava.data.conversation import generation_prompt
    from qllava.modeling.generate import answer_batch, Decoding
    n, max_new = min(8, ctx["shapes"]["answers"]), ctx["shapes"]["max_new"]
    model, tok = build(ctx, None)
    model.eval()
    rng = np.random.default_rng(7)
    side = model.encoders["image"].input_shape[-1]
    images = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]
    prompts = [generation_prompt("vicuna_v1", "<image>\n" + QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]
    ours = answer_batch(model, tok, prompts, images, Decoding(max_new_tokens=max_new, batch_size=n))
    out = Path(tempfile.mkdtemp(prefix="qllava-vllm-"))
    export_hf(model, out, tokenizer=tok)
    del model; free(ctx["device"])
    from vllm import LLM, SamplingParams
    t = time.perf_counter()
    llm = LLM(model=str(out), dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.5, enforce_eager=True)
    load_s = time.perf_counter() - t
    res = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)],
                       SamplingParams(temperature=0, max_tokens=max_new, stop=["</s>"]))
    theirs = [r.outputs[0].text.strip() for r in res]
    same = [a == b for a, b in zip(ours, theirs)]
    return dict(phase="vllm", attn="vllm", status="ok", prompts=n, vllm=_version("vllm"), load_s=round(load_s, 1),
                identical_answers=sum(same), example=dict(qllava=ours[0][:120], vllm=theirs[0][:120]))


# ---------------------------------------------------------------- report
def si(x:float, unit:str="FLOP") -> str:
    "1.23e13 -> '12.3 TFLOP' (G/M/k below)."
    for f, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= f: return f"{x / f:.3g} {p}{unit}"
    return f"{x:.3g} {unit}"


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "/")


def markdown(res:dict) -> str:
    env, pc, mode, sh = res["env"], res.get("param_counts") or {}, res["mode"], res["shapes"]
    peak, gpu = res.get("peak") or {}, env["device"] == "cuda"
    where = (f"{env.get('gpu')} ({env.get('gpu_memory_gb')} GB, sm {env.get('capability')}, driver {env.get('driver')}, CUDA {env.get('cuda_runtime')})"
             if gpu else f"CPU ({env.get('cpu_model')}, {env.get('cpus')} cores, {env.get('torch_threads')} threads, "
                         f"load average {', '.join(f'{x:.1f}' for x in env.get('loadavg', []))})")
    v = env["versions"]
    md = [f"# GPU check ({'smoke run: CPU, tiny shapes' if mode == 'smoke' else 'Quilt-LLaVA shapes on one GPU'})", "",
          f"Measured {res['date']} on {where}, in {res.get('wall_s', 0):.0f} s of a {res['budget_s']:.0f} s budget "
          f"(`python bench/gpu_check.py{' --smoke' if mode == 'smoke' else ''}`, qllava {env.get('qllava_commit')}).", "",
          "Versions: " + ", ".join(f"{k} {v[k] or 'not installed'}" for k in PACKAGES) + f"; Python {env['python']}.", ""]
    if res.get("import_error"):
        return "\n".join(md + ["**Not run**: " + _cell(res["rows"][-1]["reason"])]) + "\n"
    L, Vn = sh["llm"], sh["vision"]
    md += [f"Model: LLaMA-shaped LLM (hidden {L['hidden_size']}, {L['num_hidden_layers']} layers, {L['num_attention_heads']} heads, "
           f"MLP {L['intermediate_size']}, {pc.get('llm_total', 0) / 1e6:,.1f} M parameters, {pc.get('vocab_rows', 0):,} vocabulary rows"
           + (f": {L['vocab_size']:,} in the config, grown by build_model to len(tokenizer) = the {sh['tokenizer']} tokenizer + "
              "qllava's <image> / <sensor> tokens" if pc.get('vocab_rows', 0) > L['vocab_size'] else f", tokenizer {sh['tokenizer']}")
           + f"), CLIP ViT tower ({Vn['image_size']} px, patch {Vn['patch_size']}: {pc.get('image_tokens')} patch tokens, "
           f"width {Vn['hidden_size']}, {Vn['num_hidden_layers']} layers, frozen, select layer -2), mlp2x_gelu projector "
           f"({pc.get('projector', 0) / 1e6:.2f} M); random weights, {res['dtype']}, built by qllava.modeling.model.build_model "
           f"{'directly on the GPU' if gpu else 'on the CPU'} ({', '.join(map(str, res.get('build_s', [])))} s per build). "
           f"Max length {sh['max_length']}.", "",
           f"MFU denominator: measured {peak.get('n')}^3 {peak.get('dtype')} matmul peak **{si(peak.get('flops', 0), 'FLOP/s')}**, the higher "
           f"of the best rounds before the phases ({si(peak.get('before', 0), 'FLOP/s')}) and after them "
           f"({si(peak['after'], 'FLOP/s') if isinstance(peak.get('after'), float) else peak.get('after')}).", "",
           "## Training", "",
           "| phase | attention | batch | samples/s | tokens/s (non-pad) | tokens/sample | padding | model FLOPs/token | achieved | MFU | HFU | "
           f"peak memory{' (allocated)' if gpu else ' (process RSS)'} | s/step (std) | status |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        if r["phase"] == "answers": continue
        if r["status"] != "ok":
            md.append(f"| {r['phase']} | {r.get('attn') or ''} | {r.get('batch') or ''} | | | | | | | | | | | {r['status']}: {_cell(r.get('reason'))} |")
            continue
        md.append(f"| {r['phase']} ({r['stage']}{', GC' if r['gradient_checkpointing'] else ''}) | {r['attn']} | {r['batch']} | "
                  f"**{r['samples_per_s']:.2f}** | {r['tokens_per_s']:,.0f} | {r['mean_len']:.0f} | {100*r['padding_share']:.1f} % | "
                  f"{si(r['model_flops_per_token'])} | {si(r['achieved_flops'], 'FLOP/s')} | **{100*r['mfu']:.1f} %** | {100*r['hfu']:.1f} % | "
                  f"{r['peak_mem_gb']:.1f} GB | {r['step_s_mean']:.3f} ({r['step_s_std']:.3f}) | ok{(' (' + _cell(r['note']) + ')') if r.get('note') else ''} |")
    if res.get("flash_attention_2"): md += ["", f"flash_attention_2 rows: {res['flash_attention_2']}."]
    md += ["", f"Per phase {sh['warmup']} warm-up + {sh['steps']} timed steps, each a different batch planned by qllava's "
               "ModalityLengthGroupedSampler (longest batch first) and collated by its DataCollator; a step = copy to the device + forward "
               f"+ backward + grad clipping (1.0) + {'fused ' if gpu else ''}AdamW step{', torch.cuda.synchronize around it' if gpu else ''}. "
               + (f"Weights, gradients and AdamW states in {res['dtype']} (no DeepSpeed on one GPU; its fp32 master weights would "
                  "add memory, not model FLOPs). " if gpu else "")
               + "Stage 1 runs without gradient checkpointing because qllava's apply_stage does not enable it for pretrain; "
               "stage 2 rows use it (GC), as the published scripts do. Sample lengths (fixed seed): stage 1 = "
               f"{pc.get('image_tokens')} image tokens + <s> + caption of {sh['caption'][0]}-{sh['caption'][1]} tokens + newline; "
               f"stage 2 = {pc.get('image_tokens')} image tokens + {sh['text'][0]} + {sh['text'][1]} x Beta({sh['text'][2]}, {sh['text'][3]}) "
               f"text tokens (answer supervised, system prompt and question masked).", "",
           "Model FLOPs per step (MFU counts no recompute; HFU adds it):", ""]
    md += [f"- {k}: {val}" for k, val in FORMULAS.items()]
    md += [f"- for reference, 6 x all LLM parameters = {si(6 * pc.get('llm_total', 0))} per token", ""]
    ans = next((r for r in res["rows"] if r["phase"] == "answers"), None)
    md += ["## Batched greedy answers (qllava.modeling.generate.answer_batch)", ""]
    if ans and ans["status"] == "ok":
        ident = (("yes" + (f" ({ans['compared']} of {ans['prompts']} compared)" if ans["compared"] < ans["prompts"] else ""))
                 if ans["identical_answers"] else f"no: {ans['n_different']} of {ans['compared']} differ")
        md += ["| prompts | max new tokens | attention | one at a time: answers/s | all in one batch: answers/s | speed-up | identical answers |",
               "|---:|---:|---|---:|---:|---:|:---:|",
               f"| {ans['prompts']} | {ans['max_new_tokens']} | {ans['attn']} | {ans['batch1_answers_per_s']:.2f} ({ans['batch1_s']:.1f} s) | "
               f"{ans['batched_answers_per_s']:.2f} ({ans['batched_s']:.1f} s) | **{ans['speedup']:.1f}x** | {ident} |", ""]
        if ans.get("note"): md += [ans["note"] + ".", ""]
        if not ans["identical_answers"]:
            d = ans["first_difference"]
            md += [f"First difference: prompt {d['prompt']}, after {d['common_prefix_chars']} equal characters. With random weights "
                   "greedy picks are near ties, and kernels of different batch shapes round differently in bf16, so a near tie can flip; "
                   "in float32 on CPU (the smoke run, tests/test_model.py) batched and one-at-a-time answers are identical.", ""]
    elif ans: md += [f"{ans['status']}: {_cell(ans.get('reason'))}", ""]
    md += ["## Targets (one H200, bf16)", "", "| target | measured | met |", "|---|---:|:---:|"]
    for t in res["targets"]:
        md.append(f"| {t['what']} | {t['measured'] if t['measured'] is not None else 'not measured'} | "
                  f"{'n/a (smoke run)' if mode == 'smoke' else ('yes' if t['met'] else 'no')} |")
    md += ["", "For scale: " + "; ".join(ANCHORS) + "."]
    return "\n".join(md) + "\n"


def targets(rows:list) -> list:
    def best(phase, key):
        v = [r[key] for r in rows if r["phase"] == phase and r["status"] == "ok"]
        return max(v) if v else None
    out = []
    for what, phase, key, goal, scale, unit in [("stage 1 >= 50 samples/s", "stage1", "samples_per_s", TARGETS["stage1_samples_per_s"], 1, " samples/s"),
                                                ("stage-2 LoRA >= 40 % MFU", "lora", "mfu", TARGETS["lora_mfu"], 100, " %"),
                                                ("full stage 2 >= 35 % MFU", "full", "mfu", TARGETS["full_mfu"], 100, " %")]:
        m = best(phase, key)
        out.append(dict(what=what, measured=None if m is None else f"{m*scale:.1f}{unit}", met=m is not None and m >= goal))
    return out


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, float32: the same code in well under a minute")
    ap.add_argument("--out", default=str(HERE / "results"), help="results folder (gpu.json/.md, or gpu_smoke.* with --smoke)")
    ap.add_argument("--budget", type=float, default=None, help="seconds; phases not started by then are skipped (default 450, smoke 120)")
    ap.add_argument("--phases", default="stage1,lora,full,full_packed,answers,qlora", help="comma-separated subset, in this order "
                    "(full_packed / lora_packed: the same batches packed by qllava.data.packing.PackingCollator); "
                    "add vllm to check an export in vLLM (when vllm is installed)")
    ap.add_argument("--attn", default="auto", help="attention implementations for the training phases: auto = sdpa + "
                    "flash_attention_2 when flash_attn imports on CUDA; or a comma-separated list")
    ap.add_argument("--warmup", type=int, default=None); ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch1", type=int, default=None); ap.add_argument("--batch2", type=int, default=None)
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    mode = "smoke" if args.smoke else "gpu"
    shapes = dict(SHAPES[mode])
    for k in ("batch1", "batch2", "warmup", "steps"):
        if getattr(args, k) is not None: shapes[k] = getattr(args, k)
    budget = args.budget if args.budget is not None else shapes["budget"]
    if mode == "gpu" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run `python bench/gpu_check.py --smoke` for the CPU smoke run.", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    if args.smoke: torch.set_num_threads(min(2, os.cpu_count() or 1))
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    env = environment(device)
    print(json.dumps(env, indent=1), flush=True)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    name = "gpu_smoke" if args.smoke else "gpu"
    res = dict(mode=mode, date=time.strftime("%Y-%m-%d %H:%M"), env=env, shapes=shapes, dtype=str(dtype).replace("torch.", ""),
               budget_s=budget, rows=[], formulas=FORMULAS, targets=[], anchors=ANCHORS)

    ctx = dict(device=device, dtype=dtype, shapes=shapes, budget=budget, deadline=t_start + budget,
               warmup=shapes["warmup"], steps=shapes["steps"])

    def write():
        res["wall_s"] = round(time.monotonic() - t_start, 1)
        res["targets"] = targets(res["rows"])
        res["param_counts"], res["build_s"] = ctx.get("pc"), ctx.get("build_s", [])
        (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
        (out / f"{name}.md").write_text(markdown(res))

    try:
        import qllava.modeling.model, qllava.training.train, qllava.modeling.generate, qllava.data.dataset  # noqa: F401
    except Exception as e:  # e.g. transformers older than qllava needs (qllava.modeling.model imports SubConfigSpec, transformers >= 5.20)
        res["import_error"] = f"{type(e).__name__}: {e}"
        res["rows"].append(dict(phase="import", status="error", reason=(
            f"qllava does not import with transformers {_version('transformers')}: {type(e).__name__}: {e}. qllava is developed "
            "with transformers 5.24 (qllava.modeling.model imports SubConfigSpec, which transformers has from 5.20 on). Fix: "
            "pip install -e . (or, offline, carry that transformers wheel: see bench/results/gpu.md).")))
        res["peak"] = {}
        write(); print(res["rows"][-1]["reason"], file=sys.stderr)
        return 2

    if args.attn == "auto":
        attns = ["sdpa"]
        fa, why_fa = importable("flash_attn") if device == "cuda" else (False, "flash_attn needs CUDA")
        if fa: attns.append("flash_attention_2")
        else: res["flash_attention_2"] = f"skipped: {why_fa}"
    else: attns = args.attn.split(",")
    if device == "cuda":  # the recipes' --tf32 True (bf16 matmuls are unaffected)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tmp = tempfile.TemporaryDirectory(prefix="qllava-gpu-check-")
    ctx["llm_spec"], ctx["vision_spec"] = write_presets(Path(tmp.name), shapes)
    peak = matmul_peak(device, dtype, shapes["matmul_n"], warm_s=shapes["matmul_warm_s"])
    peak["before"] = peak["flops"]
    res["peak"] = ctx["peak"] = peak
    print(f"matmul peak {peak['n']}^3 {peak['dtype']}: {peak['flops']/1e12:.1f} TFLOP/s", flush=True)

    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    plan = [(p, a) for p in ("stage1", "lora", "full", "full_packed", "lora_packed") if p in phases for a in attns]
    plan = sorted(plan, key=lambda x: attns.index(x[1]))  # every phase with sdpa first, then with flash-attention
    plan += [(p, None) for p in ("answers", "qlora", "vllm") if p in phases]
    for kind, attn in plan:
        row = dict(phase=kind, attn=attn if kind != "qlora" else "sdpa")
        batch = shapes["batch1"] if kind == "stage1" else shapes["batch2"]
        t0 = time.monotonic()
        try:
            if t0 > ctx["deadline"]: raise Skip(f"time budget ({budget:.0f} s) spent before this phase")
            if attn == "flash_attention_2" and dtype == torch.float32: raise Skip("flash_attention_2 needs bf16/fp16")
            oom = None
            try:
                phase = {"answers": answers_phase, "vllm": vllm_phase}.get(kind)
                row = phase(ctx) if phase else train_phase(kind, row["attn"], ctx, batch)
            except Exception as e:  # out of memory: once more at half the batch, so the phase still gives a figure
                if not is_oom(e) or kind in ("answers", "vllm") or batch < 2: raise
                oom = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
            if oom is not None:  # outside the handler: the failed attempt's traceback (and its tensors) are released
                free(device)
                row = train_phase(kind, row["attn"], ctx, batch // 2)
                row["note"] = f"out of memory at batch {batch} ({oom[:120]}); measured at batch {batch // 2}"
        except Skip as e:
            row.update(status="skipped", reason=str(e))
        except ImportError as e:
            row.update(status="skipped", reason=f"missing optional library: {e}")
        except Exception as e:
            first = (str(e).splitlines() or [""])[0]
            if is_oom(e): row.update(status="skipped", reason=f"out of memory: {first[:200]}")
            else:
                traceback.print_exc()
                row.update(status="error", reason=f"{type(e).__name__}: {first[:300]}")
        row["phase_s"] = round(time.monotonic() - t0, 1)
        row.setdefault("batch", batch if kind != "answers" else None)
        res["rows"].append(row)
        free(device)
        show = {k: v for k, v in row.items() if k not in ("formula", "example")}
        print(json.dumps(show), flush=True)
        write()  # after every phase, so a run cut short still leaves its figures
    try:
        p2 = matmul_peak(device, dtype, shapes["matmul_n"], warm_s=shapes["matmul_warm_s"])
        peak["after"] = p2["flops"]
        if p2["flops"] > peak["flops"]:  # the higher of the two is the peak: MFU is never flattered by a cold first reading
            peak["flops"] = p2["flops"]
            for r in res["rows"]:
                if r.get("status") == "ok" and "achieved_flops" in r:
                    r["mfu"], r["hfu"] = round(r["achieved_flops"] / peak["flops"], 4), round(r["hardware_flops"] / peak["flops"], 4)
    except Exception as e: peak["after"] = f"not measured ({type(e).__name__})"
    write()
    tmp.cleanup()
    print(markdown(res))
    return 1 if any(r["status"] == "error" for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
