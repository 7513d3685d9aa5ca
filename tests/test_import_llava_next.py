"""`qllava import-llava` of LLaVA-NeXT-format checkpoints (issue 19): a Llama-3 (`llava_llama`) and a Qwen2
(`llava_qwen`) model written with LLaVA-NeXT's key and field names on the real Llama-3.1 / Qwen2.5 vocabularies
(`make vocab`) import to the original's logits (its forward for LLaVA-1.5's image path: the projected patches spliced
at the image marker), in the template LLaVA-NeXT trains those backbones with; its AnyRes tiling is refused by name."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from qllava.core import ConfigError, CheckpointError
from qllava.testing.vocab import hub_tokenizer_dir, vocab_cache

LLAMA3, QWEN25 = "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct"


def _tok(repo):
    from transformers import AutoTokenizer
    try: return AutoTokenizer.from_pretrained(hub_tokenizer_dir(repo, build=False))
    except ConfigError: pytest.skip(f"{repo}'s tokenizer is not built in {vocab_cache()}: run `make vocab` first")


def _write_next(root:Path, repo:str, **fields):
    "A LLaVA-NeXT-format folder (LlavaLlamaForCausalLM / LlavaQwenForCausalLM): LLM config + mm_* fields, safetensors."
    from safetensors.torch import save_file
    from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)
    torch.manual_seed(0)
    tok = _tok(repo)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                            num_attention_heads=4, image_size=32, patch_size=8)).eval()
    clip.save_pretrained(root / "clip")
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=512)
    if repo == QWEN25:
        cls, lcfg, mt = Qwen2ForCausalLM, Qwen2Config(vocab_size=152064, **small), "llava_qwen"
    else:
        lcfg = LlamaConfig(vocab_size=128256, bos_token_id=128000, eos_token_id=128009, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, **small)
        cls, mt = LlamaForCausalLM, "llava_llama"
    llm = cls(lcfg).eval()
    proj = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 64))
    sd = dict(llm.state_dict()) | {f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}
    ck = root / "next"
    tok.save_pretrained(ck)
    save_file({k: v.contiguous() for k, v in sd.items()}, ck / "model.safetensors")
    cfg = json.loads(lcfg.to_json_string()) | {
        "architectures": ["LlavaQwenForCausalLM" if mt == "llava_qwen" else "LlavaLlamaForCausalLM"], "model_type": mt,
        "mm_vision_tower": str(root / "clip"), "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 48,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
        "image_grid_pinpoints": None, "mm_tunable_parts": "mm_mlp_adapter", "mm_spatial_pool_mode": "bilinear",
        "tokenizer_model_max_length": 4096, "tokenizer_padding_side": "right"} | fields
    (ck / "config.json").write_text(json.dumps(cfg, indent=1))
    return ck, llm, clip, proj


@torch.no_grad()
def _original_logits(llm, clip, proj, ids:list, marker_at:int, pixels):
    "The original forward: text embeddings with the projected patch features spliced in at the image marker."
    emb = llm.get_input_embeddings()
    feats = proj(clip(pixels[None], output_hidden_states=True).hidden_states[-2][:, 1:])[0]
    x = torch.cat([emb(torch.tensor(ids[:marker_at])), feats, emb(torch.tensor(ids[marker_at:]))])[None]
    return llm(inputs_embeds=x).logits[0]


@pytest.mark.parametrize("repo,template,stop", [(LLAMA3, "llama_3", "<|eot_id|>"), (QWEN25, "qwen_2", "<|im_end|>")])
def test_llava_next_checkpoint_imports_to_its_logits_in_its_template(tmp_path, repo, template, stop):
    from PIL import Image
    from qllava.modeling.checkpoint import import_llava_cli, load_model
    from qllava.data.conversation import generation_prompt, get_template
    from qllava.modeling.generate import collect_media, encode_prompts
    ck, llm, clip, proj = _write_next(tmp_path, repo)
    assert import_llava_cli([str(ck), str(tmp_path / "imported")]) == 0
    model, tok = load_model(tmp_path / "imported")
    assert model.config.template == template and list(model.config.stop_strings) == [stop]
    prompt = generation_prompt(get_template(template, tok), "<image>\nWhat does this tissue show?")
    img = Image.fromarray((torch.rand(40, 28, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    ids, mask = encode_prompts(tok, [prompt], model.config)
    media = collect_media(model, [img], [prompt])
    ours = model(input_ids=ids, attention_mask=mask, media=media).logits[0]
    row = ids[0].tolist()
    media_id = model.config.media_token_ids["image"]
    at = row.index(media_id)
    text = [t for t in row if t != media_id]
    assert text[0] == tok.bos_token_id if repo == LLAMA3 else text[0] != tok.bos_token_id   # Qwen adds no BOS
    ref = _original_logits(llm, clip, proj, text, at, media["image"][0])
    V = llm.config.vocab_size
    torch.testing.assert_close(ours[:, :V], ref, rtol=1e-4, atol=1e-5)


def test_anyres_llava_next_checkpoint_is_refused_by_name(tmp_path):
    from qllava.modeling.checkpoint import import_llava
    ck, *_ = _write_next(tmp_path, LLAMA3, image_aspect_ratio="anyres_max_9", mm_patch_merge_type="spatial_unpad")
    with pytest.raises(CheckpointError, match="AnyRes.*--image_aspect_ratio pad --mm_patch_merge_type flat"):
        import_llava(ck)
