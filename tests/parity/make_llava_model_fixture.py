#!/usr/bin/env python
"""Build a tiny ORIGINAL-format LLaVA-1.5 checkpoint with the original code (haotian-liu/LLaVA, PyPI
`llava-torch==1.2.2.post1`) from a fixed seed, run the original inference path on a square and a non-square image, and
write prompt ids, pixels and logits to `tests/parity/llava_model/` (see README.md there).

Runs in the scratch venv made by `make_llava_model_fixture.sh`; imports nothing from qllava (it only reads the repo's
demo tokenizer folder, through `make_llava_fixture._tokenizers_015_json`, the rewrite the ids fixture already uses).

Build = what `llava/train/train.py: train()` does for LLaVA-1.5 stage 2 (`--version v1 --vision_tower CLIP
--mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --mm_use_im_start_end False --mm_use_im_patch_token False
--image_aspect_ratio pad`), minus the training: `LlavaLlamaForCausalLM.from_pretrained(base LLM)`, the tokenizer
(`use_fast=False`, `pad_token = unk_token`), `model.get_model().initialize_vision_modules(model_args)`, the `model.config`
fields train() sets, `initialize_vision_tokenizer`, `config.use_cache = True`, then the save of
`safe_save_model_for_hf_trainer` -> `Trainer._save`: `model.save_pretrained(safe_serialization=True)` +
`tokenizer.save_pretrained`. The weights are the seeded random initialisation (no step is trained).

Inference = `llava/eval/model_vqa.py` with `--conv-mode vicuna_v1`, where `load_pretrained_model` is replayed step by step
in float32 on CPU (it hard-codes float16 and `device_map`, which needs accelerate): `AutoTokenizer.from_pretrained(path,
use_fast=False)`, `LlavaLlamaForCausalLM.from_pretrained(path)`, no tokens added (mm_use_im_patch_token and
mm_use_im_start_end are False), `resize_token_embeddings(len(tokenizer))`, `vision_tower.load_model()` (the tower comes
from `mm_vision_tower`, as in the original), `image_processor = vision_tower.image_processor`; then per question:
`conv_templates['vicuna_v1']` with `'<image>\\n' + question`, `tokenizer_image_token`, `Image.open(f).convert('RGB')`,
`process_images([image], image_processor, model.config)[0]`, and `model(input_ids, images=..., image_sizes=[size])`, the
forward of the first `generate` step (same `prepare_inputs_labels_for_multimodal`).
"""
import argparse, datetime, json, os, pathlib, platform, shutil, sys, tempfile
from importlib import metadata

import numpy as np
import torch, transformers
from PIL import Image
from safetensors.torch import save_file

from llava.constants import IMAGE_TOKEN_INDEX, DEFAULT_IMAGE_TOKEN
from llava.conversation import conv_templates
from llava.mm_utils import tokenizer_image_token, process_images
from llava.model import LlavaLlamaForCausalLM
from llava.train.train import ModelArguments

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from make_llava_fixture import _tokenizers_015_json  # noqa: E402  (the 0.15-schema rewrite of the demo tokenizer)

OUT_REL = "tests/parity/llava_model"
CLIP_REL = f"{OUT_REL}/clip-vit-tiny"          # mm_vision_tower as the config stores it: relative to the repo root
CKPT_NAME = "llava-v1.5-tiny"                  # load_pretrained_model takes the LLaVA branch only if the name has 'llava'
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGES = {"square": (70, 70), "wide": (80, 48)}   # (width, height); 70 px so the resize to 56 px does something
QUESTIONS = {"square": "What is shown in this image?", "wide": "Describe the tissue, please. Is it stained?"}
SEED = 0


def make_clip(folder):
    "A tiny CLIPVisionModel (56 px, patch 14 -> 16 patches, 3 blocks so select layer -2 is not the last) + its processor."
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                        image_size=56, patch_size=14, projection_dim=32, hidden_act="quick_gelu")
    torch.manual_seed(SEED)
    tower = transformers.CLIPVisionModel(cfg).eval()
    tower.save_pretrained(folder, safe_serialization=True)
    # what openai/clip-vit-large-patch14(-336) ships, at 56 px: shortest edge 56, centre crop 56x56, bicubic, CLIP mean/std
    transformers.CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, resample=3,
                                    do_center_crop=True, do_normalize=True, do_resize=True, do_rescale=True,
                                    rescale_factor=1 / 255, do_convert_rgb=True,
                                    image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(folder)


def make_base_llm(folder, tok_folder):
    "The stage-2 starting LLM: a tiny seeded LlamaForCausalLM (GQA; init std 0.1: logits O(1) and attention far from uniform, while float32 noise stays ~2e-6) + the tokenizer."
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_folder), use_fast=False)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=False,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    torch.manual_seed(SEED + 1)
    llm = transformers.LlamaForCausalLM(cfg)
    llm.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def build_llava(base, out):
    "train()'s model set-up for LLaVA-1.5 stage 2 (no training step), then its save."
    model_args = ModelArguments(model_name_or_path=str(base), version="v1", vision_tower=CLIP_REL,
                                mm_vision_select_layer=-2, mm_projector_type="mlp2x_gelu", mm_use_im_start_end=False,
                                mm_use_im_patch_token=False, mm_vision_select_feature="patch")
    model = LlavaLlamaForCausalLM.from_pretrained(str(base), torch_dtype=None)
    model.config.use_cache = False
    tok = transformers.AutoTokenizer.from_pretrained(str(base), model_max_length=2048, padding_side="right", use_fast=False)
    tok.pad_token = tok.unk_token
    torch.manual_seed(SEED + 2)  # the projector's nn.Linear default init
    model.get_model().initialize_vision_modules(model_args=model_args, fsdp=[])
    # train() casts the tower to bf16/fp16 here (vision_tower.to(dtype=...)); kept float32 for a float32 parity fixture
    c = model.config
    c.image_aspect_ratio = "pad"
    c.tokenizer_padding_side = tok.padding_side
    c.tokenizer_model_max_length = tok.model_max_length
    c.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
    c.freeze_mm_mlp_adapter = False
    c.mm_use_im_start_end = model_args.mm_use_im_start_end
    c.mm_projector_lr = None
    c.mm_use_im_patch_token = model_args.mm_use_im_patch_token
    model.initialize_vision_tokenizer(model_args, tokenizer=tok)
    c.use_cache = True
    c._name_or_path = "tiny-llama-base"  # the scratch folder the base LLM was loaded from (a random temp path otherwise)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return model


def make_images(folder):
    rng = np.random.default_rng(SEED)
    paths = {}
    for name, (w, h) in IMAGES.items():
        a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        a[: h // 2, : w // 3] //= 4  # a dark block, so the picture has structure, not only noise
        p = folder / f"{name}.png"
        Image.fromarray(a, "RGB").save(p, format="PNG")
        paths[name] = p
    return paths


def load_like_model_vqa(ckpt):
    "load_pretrained_model(ckpt, None, 'llava-v1.5-tiny') step by step, float32, CPU."
    tok = transformers.AutoTokenizer.from_pretrained(str(ckpt), use_fast=False)
    model = LlavaLlamaForCausalLM.from_pretrained(str(ckpt), torch_dtype=torch.float32)
    if getattr(model.config, "mm_use_im_patch_token", True) or getattr(model.config, "mm_use_im_start_end", False):
        raise SystemExit("fixture expects mm_use_im_patch_token = mm_use_im_start_end = False")
    model.resize_token_embeddings(len(tok))
    vt = model.get_vision_tower()
    if not vt.is_loaded: vt.load_model()
    return tok, model.eval(), vt.image_processor


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--command", default=" ".join(sys.argv), help="recorded in meta")
    a = ap.parse_args()
    os.chdir(ROOT)  # mm_vision_tower is relative to the repo root, for the original and for qllava alike
    out = ROOT / OUT_REL
    for p in (CKPT_NAME, "clip-vit-tiny", "images", "original_outputs.safetensors", "original_outputs.json"):
        p = out / p  # only what this script writes (README.md stays)
        if p.is_dir(): shutil.rmtree(p)
        elif p.exists(): p.unlink()
    (out / "images").mkdir(parents=True)
    torch.set_num_threads(1)
    make_clip(ROOT / CLIP_REL)
    with tempfile.TemporaryDirectory(prefix="llava-model-fixture-") as scratch:
        scratch = pathlib.Path(scratch)
        tok_src = ROOT / "qllava/assets/tokenizers/llama-demo"
        tok_dir = scratch / "llama-demo"
        shutil.copytree(tok_src, tok_dir)
        tok_changes = _tokenizers_015_json(tok_src / "tokenizer.json", tok_dir / "tokenizer.json")
        make_base_llm(scratch / "base", tok_dir)
        build_llava(scratch / "base", out / CKPT_NAME)

    tok, model, proc = load_like_model_vqa(out / CKPT_NAME)
    images = make_images(out / "images")
    tensors, cases = {}, {}
    for name, path in images.items():
        qs = DEFAULT_IMAGE_TOKEN + "\n" + QUESTIONS[name]
        conv = conv_templates["vicuna_v1"].copy()
        conv.append_message(conv.roles[0], qs)
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        input_ids = tokenizer_image_token(prompt, tok, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
        image = Image.open(path).convert("RGB")
        pixels = process_images([image], proc, model.config)[0]
        with torch.inference_mode():
            feats = model.encode_images(pixels.unsqueeze(0))  # (1, N, hidden): projected image features
            logits = model(input_ids, images=pixels.unsqueeze(0), image_sizes=[image.size]).logits[0]
        n = feats.shape[1]
        assert logits.shape[0] == input_ids.shape[1] - 1 + n, (logits.shape, input_ids.shape, n)
        tensors |= {f"{name}.input_ids": input_ids[0].contiguous(), f"{name}.pixel_values": pixels.contiguous(),
                    f"{name}.image_features": feats[0].float().contiguous(), f"{name}.logits": logits.float().contiguous()}
        cases[name] = {"image": f"images/{path.name}", "image_size": list(image.size), "question": QUESTIONS[name],
                       "prompt": prompt, "n_ids": input_ids.shape[1],
                       "image_position": int((input_ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0, 0]),
                       "n_image_features": n, "n_logit_rows": logits.shape[0],
                       "argmax_last": int(logits[-1].argmax())}
        print(f"{name}: image {image.size} -> pixels {tuple(pixels.shape)}, ids {input_ids.shape[1]} "
              f"(-200 at {cases[name]['image_position']}), logits {tuple(logits.shape)}", file=sys.stderr)
    save_file(tensors, str(out / "original_outputs.safetensors"))
    meta = {"versions": {p: metadata.version(p) for p in ("torch", "transformers", "tokenizers", "sentencepiece",
                                                          "llava-torch", "pillow", "numpy", "safetensors")},
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": a.command, "seed": SEED,
            "original": "haotian-liu/LLaVA as PyPI llava-torch==1.2.2.post1",
            "checkpoint": CKPT_NAME, "vision_tower": CLIP_REL, "conv_mode": "vicuna_v1",
            "image_token_index": IMAGE_TOKEN_INDEX, "dtype": "float32", "device": "cpu",
            "image_mean": list(proc.image_mean), "image_std": list(proc.image_std),
            "attn_implementation": model.config._attn_implementation,
            "tokenizer": {"source": "qllava/assets/tokenizers/llama-demo", "class": type(tok).__name__,
                          "len": len(tok), "rewrite_to_tokenizers_0.15_schema": tok_changes},
            "tensors": {k: list(v.shape) for k, v in tensors.items()},
            "cases": cases}
    (out / "original_outputs.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
