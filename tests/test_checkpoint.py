"""qllava.modeling.checkpoint on tiny models: manifest-driven save/load round trips, the projector file under its original key
names in both directions, an original LLaVA checkpoint written here exactly as the original code names keys and config
fields, export to transformers' Llava (logits and greedy answers), safe .bin loading, and the CLI functions."""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import json, shutil
from pathlib import Path
import pytest, torch
from torch import nn
from qllava.core import CheckpointError
from qllava.modeling.model import build_model, QllavaForCausalLM
from qllava.modeling.generate import answer_batch, encode_prompts, Decoding
from qllava.modeling.checkpoint import (MANIFEST, read_manifest, save_checkpoint, load_checkpoint, load_model, save_projector,
                               load_projector, projector_state_dict, load_state_file, import_llava, export_hf,
                               import_llava_cli, export_hf_cli, extract_projector_cli)

IMAGE_TOKEN_INDEX = -200  # the original code's in-sequence image marker (not a vocabulary id)


@pytest.fixture(scope="module")
def mm():
    return build_model("preset:tiny-llama", {"image": "preset:tiny-clip"}, seed=0)


def _img(model, k=1, seed=0):
    return torch.randn(k, *model.encoders["image"].input_shape, generator=torch.Generator().manual_seed(seed))


def _batch(model):
    N, mid = model.config.encoder_num_tokens["image"], model.config.media_token_ids["image"]
    ids = torch.tensor([[1, 30, 31] + [mid] * N + [32, 33], [1, 34] + [mid] * N + [35, 36, 0]])
    mask = torch.ones_like(ids); mask[1, -1] = 0
    return dict(input_ids=ids, attention_mask=mask, images=_img(model, 2, 3))


@torch.no_grad()
def _logits(model, batch): return model(**batch).logits


def test_full_round_trip_identical_logits(mm, tmp_path):
    model, tok = mm
    folder = tmp_path / "llava-v1.5-7b-pretrain"  # a misleading name: loading must follow the manifest, not the name
    model.save_pretrained(folder, tokenizer=tok, stage="finetune")
    man = read_manifest(folder)
    assert man["stage"] == "finetune" and man["components"] == ["llm", "encoders", "projectors"]
    assert man["encoders"] == {"image": "preset:tiny-clip"} and man["base_llm"] == "preset:tiny-llama"
    assert man["template"] == model.config.template and man["stop_strings"] == model.config.stop_strings
    assert (folder / "model.safetensors").is_file() and (folder / "mm_projector.bin").is_file()
    loaded = QllavaForCausalLM.from_pretrained(folder)
    b = _batch(model)
    assert torch.equal(_logits(loaded, b), _logits(model, b))
    m2, tok2 = load_model(folder)
    assert tok2.convert_tokens_to_ids("<image>") == model.config.media_token_ids["image"]


def test_two_modalities_round_trip(tmp_path):
    model, tok = build_model("preset:tiny-llama", {"image": "preset:tiny-clip", "sensor": "preset:tiny-limu"}, seed=1)
    save_checkpoint(model, tmp_path / "c", tokenizer=tok, stage="finetune")
    loaded = load_checkpoint(tmp_path / "c")
    N = model.config.encoder_num_tokens["sensor"]
    ids = torch.tensor([[1, 5] + [model.config.media_token_ids["sensor"]] * N + [6]])
    x = torch.randn(1, *model.encoders["sensor"].input_shape)
    with torch.no_grad(): assert torch.equal(loaded(input_ids=ids, sensors=x).logits, model(input_ids=ids, sensors=x).logits)
    assert (tmp_path / "c" / "sensor_projector.bin").is_file()


def test_projector_only_stage1_round_trip(mm, tmp_path):
    model, tok = mm
    trained, _ = build_model(seed=0)
    with torch.no_grad():
        for p in trained.projectors.parameters(): p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(trained, tmp_path / "s1", tokenizer=tok, stage="pretrain", components=["projectors"])
    assert not any(k.startswith("llm.") for k in load_state_file(tmp_path / "s1" / "model.safetensors"))
    loaded = load_checkpoint(tmp_path / "s1")
    b = _batch(model)
    torch.testing.assert_close(_logits(loaded, b), _logits(trained, b), rtol=0, atol=0)


def test_manifest_errors(mm, tmp_path):
    model, tok = mm
    with pytest.raises(CheckpointError, match="not a qllava checkpoint"): load_checkpoint(tmp_path)
    save_checkpoint(model, tmp_path / "c", tokenizer=tok)
    man = json.loads((tmp_path / "c" / MANIFEST).read_text())
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"): load_checkpoint(tmp_path / "c")
    (tmp_path / "c" / MANIFEST).write_text(json.dumps(man | {"components": ["llm", "optimizer"]}))
    with pytest.raises(CheckpointError, match="unknown components"): load_checkpoint(tmp_path / "c")


def test_projector_file_original_keys_both_directions(mm, tmp_path):
    model, tok = mm
    save_projector(model, tmp_path)
    sd = torch.load(tmp_path / "mm_projector.bin", weights_only=True)  # what the original code's loader does
    assert sorted(sd) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight", "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    assert sorted(load_state_file(tmp_path / "mm_projector.safetensors")) == sorted(sd)
    # the original builder's mlp2x_gelu: Sequential(Linear, GELU, Linear); load ours there as the original does
    d_enc, d = model.encoders["image"].hidden_size, model.llm.config.hidden_size
    theirs = nn.Sequential(nn.Linear(d_enc, d), nn.GELU(), nn.Linear(d, d))
    theirs.load_state_dict({k.split("mm_projector.")[1]: v for k, v in sd.items() if "mm_projector" in k})
    x = torch.randn(2, 3, d_enc)
    with torch.no_grad(): torch.testing.assert_close(theirs(x), model.projectors["image"](x))
    # a published projector written the original way loads into ours
    torch.manual_seed(5)
    published = nn.Sequential(nn.Linear(d_enc, d), nn.GELU(), nn.Linear(d, d))
    torch.save({f"model.mm_projector.{k}": v for k, v in published.state_dict().items()}, tmp_path / "published.bin")
    other, _ = build_model(seed=3)
    load_projector(other, tmp_path / "published.bin")
    with torch.no_grad(): torch.testing.assert_close(other.projectors["image"](x), published(x))
    # linear: the original is a bare nn.Linear (keys model.mm_projector.weight / .bias)
    lin, _ = build_model(projector="linear", seed=0)
    save_projector(lin, tmp_path / "lin")
    assert sorted(torch.load(tmp_path / "lin" / "mm_projector.bin", weights_only=True)) == ["model.mm_projector.bias", "model.mm_projector.weight"]
    lin2, _ = build_model(projector="linear", seed=4)
    load_projector(lin2, tmp_path / "lin")
    assert torch.equal(lin2.projectors["image"].weight, lin.projectors["image"].weight)
    with pytest.raises(CheckpointError, match="does not fit"): load_projector(lin2, tmp_path / "published.bin")


def test_unsafe_pickle_refused(tmp_path):
    import argparse
    torch.save({"model.mm_projector.0.weight": torch.ones(2), "args": argparse.Namespace(lr=1)}, tmp_path / "mm_projector.bin")
    with pytest.raises(CheckpointError, match="refused to load"): load_state_file(tmp_path / "mm_projector.bin")


# ---------------------------------------------------------------- an original LLaVA checkpoint, written as the original names it

def _write_original(root:Path, tok_src, seed=0):
    "A LlavaLlamaForCausalLM-format folder: LLaMA config + mm_* fields, sharded pytorch_model-*.bin with an index."
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    clip_dir = root / "clip-vit-tiny"
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                            image_size=32, patch_size=8)).eval()
    clip.save_pretrained(clip_dir)
    tok = tok_src  # the original tokenizer has no <image> token: save the shipped one as it is
    ck = root / "llava-original"
    tok.save_pretrained(ck)
    V = len(tok)
    lcfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=V, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       tie_word_embeddings=False, max_position_embeddings=256)
    llm = LlamaForCausalLM(lcfg).eval()
    proj = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 64))
    # key names exactly as LlavaLlamaForCausalLM's state dict (vision tower of transformers 4.x: `.vision_model.` inside)
    sd = {k: v for k, v in llm.state_dict().items()}
    sd |= {f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}
    sd |= {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in clip.state_dict().items()}
    keys = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2], "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for f, ks in shards.items(): torch.save({k: sd[k].clone() for k in ks}, ck / f)
    (ck / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    cfg = json.loads(lcfg.to_json_string())
    cfg |= {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "mm_vision_tower": str(clip_dir),
            "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 48, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
            "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
            "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "use_mm_proj": True, "tokenizer_model_max_length": 2048,
            "tokenizer_padding_side": "right", "torch_dtype": "float32"}
    (ck / "config.json").write_text(json.dumps(cfg, indent=2))
    return ck, llm, clip, proj


@torch.no_grad()
def _original_logits(llm, clip, proj, ids_with_marker:list, image):
    "The original forward: embed text, splice the projected patch features at the IMAGE_TOKEN_INDEX marker."
    i = ids_with_marker.index(IMAGE_TOKEN_INDEX)
    emb = llm.get_input_embeddings()
    feats = proj(clip(image[None], output_hidden_states=True).hidden_states[-2][:, 1:])[0]
    x = torch.cat([emb(torch.tensor(ids_with_marker[:i])), feats, emb(torch.tensor(ids_with_marker[i + 1:]))])[None]
    return llm(inputs_embeds=x).logits[0]


def test_import_original_llava_identical_logits(tmp_path):
    from qllava.data.presets import load_tokenizer
    ck, llm, clip, proj = _write_original(tmp_path, load_tokenizer("llama-demo"))
    V = llm.config.vocab_size
    model, tok = import_llava(ck, tmp_path / "imported")
    man = read_manifest(tmp_path / "imported")
    assert man["stage"] == "import" and man["encoders"]["image"].startswith("hf-clip:")
    assert model.config.encoder_num_tokens["image"] == 16 and model.config.projector == "mlp2x_gelu"
    text = tok("USER: what is this? ASSISTANT:", add_special_tokens=False).input_ids
    orig_ids = [tok.bos_token_id] + text[:3] + [IMAGE_TOKEN_INDEX] + text[3:]
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = _original_logits(llm, clip, proj, orig_ids, image)
    ids = torch.tensor([[tok.bos_token_id] + text[:3] + [model.config.media_token_ids["image"]] * 16 + text[3:]])
    for m in (model, load_checkpoint(tmp_path / "imported")):
        with torch.no_grad(): ours = m(input_ids=ids, images=image[None]).logits[0]
        assert ours.shape[-1] == len(tok) >= V
        torch.testing.assert_close(ours[:, :V], ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointError, match="import-llava"): load_checkpoint(ck)  # the original folder is not ours


def test_import_llava_cli_and_wrong_encoder(tmp_path):
    from qllava.data.presets import load_tokenizer
    ck, *_ = _write_original(tmp_path, load_tokenizer("llama-demo"), seed=1)
    assert import_llava_cli([str(ck), str(tmp_path / "out")]) == 0
    assert read_manifest(tmp_path / "out")["components"] == ["llm", "encoders", "projectors"]
    with pytest.raises(CheckpointError, match="mm_hidden_size is 48"):
        import_llava(ck, encoder="preset:tiny-clip")


# ---------------------------------------------------------------- export to transformers' Llava

def test_export_hf_identical_logits_and_greedy(mm, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model, tok = mm
    save_checkpoint(model, tmp_path / "ck", tokenizer=tok)
    assert export_hf_cli([str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    b = _batch(model)
    with torch.no_grad():
        theirs = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["images"]).logits
    real = b["attention_mask"].bool()  # padded positions are never read
    torch.testing.assert_close(theirs[real], _logits(model, b)[real], rtol=1e-4, atol=1e-5)
    # the processor expands <image> to the same N tokens our tokenization does
    proc = AutoProcessor.from_pretrained(tmp_path / "hf")
    prompt = "USER: <image>\nWhat is shown? ASSISTANT:"
    from PIL import Image
    pil = Image.new("RGB", (32, 32), (120, 60, 30))
    p_ids = proc(text=[prompt], images=[pil], return_tensors="pt").input_ids
    ours, _ = encode_prompts(tok, [prompt], model.config)
    # the text after the image block is tokenised as a chunk of its own, as training (the original's
    # tokenizer_image_token) does: "▁" "\n", although the processor tokenises the whole prompt at once
    after = ours[0].tolist().index(model.config.media_token_ids["image"]) + model.config.encoder_num_tokens["image"]
    assert ours[0].tolist()[after] == tok.convert_tokens_to_ids("▁") and p_ids[0].tolist() == ours[0].tolist()
    # greedy answers: transformers' generate on the exported model == ours, batched with left padding
    prompts = ["USER: <image>\nWhat is shown? ASSISTANT:", "USER: <image>\nDescribe the tissue, please. ASSISTANT:",
               "USER: hello ASSISTANT:", "USER: <image>\nbrown? ASSISTANT:"]
    media = [_img(model, 1, 10)[0], _img(model, 1, 11)[0], None, _img(model, 1, 12)[0]]
    answers = answer_batch(model, tok, prompts, media, Decoding(max_new_tokens=10, stop_strings=[]))
    ids, mask = encode_prompts(tok, prompts, model.config)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.stack([m for m in media if m is not None]),
                          max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    hf_answers = [t.strip() for t in tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]
    assert hf_answers == answers and all(answers)


def test_export_hf_processor_pads_like_training(mm, tmp_path):
    "A non-square (80x48) image: the exported processor pads with int(mean*255) as training does, so logits agree."
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, CLIPImageProcessor, LlavaForConditionalGeneration
    model, tok = mm
    save_checkpoint(model, tmp_path / "ck", tokenizer=tok)
    assert export_hf_cli([str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    ours = model.encoders["image"].processor(pil)[None]
    exact = AutoImageProcessor.from_pretrained(tmp_path / "hf", use_fast=False)(pil, return_tensors="pt").pixel_values
    fast = AutoImageProcessor.from_pretrained(tmp_path / "hf")(pil, return_tensors="pt").pixel_values
    torch.testing.assert_close(exact, ours, rtol=0, atol=1e-5)          # PIL backend: the same pixels
    assert (fast - ours).abs().max() < 0.05                               # torchvision bicubic: within resampling noise
    S = ours.shape[-1]
    crop = CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})(pil, return_tensors="pt").pixel_values
    assert (crop - ours).abs().max() > 0.5                                # what the old centre-cropping export gave
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    b = _batch(model); ids, mask = b["input_ids"][:1], b["attention_mask"][:1]
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, pixel_values=exact).logits
        mine = model(input_ids=ids, attention_mask=mask, images=ours).logits
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-5)


def test_export_refuses_what_llava_cannot_hold(tmp_path):
    from qllava.core import ConfigError
    lin, _ = build_model(projector="linear", seed=0)
    with pytest.raises(ConfigError, match="mlp2x_gelu"): export_hf(lin, tmp_path / "a")
    imu, _ = build_model(encoders={"sensor": "preset:tiny-limu"}, seed=0)
    with pytest.raises(ConfigError, match="image"): export_hf(imu, tmp_path / "b")


def test_extract_projector_cli(mm, tmp_path):
    model, tok = mm
    save_checkpoint(model, tmp_path / "ck", tokenizer=tok, stage="pretrain")
    assert extract_projector_cli([str(tmp_path / "ck"), str(tmp_path / "p")]) == 0
    sd = torch.load(tmp_path / "p" / "mm_projector.bin", weights_only=True)
    ref = projector_state_dict(model)
    assert sorted(sd) == sorted(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
