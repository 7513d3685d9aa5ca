"""Encoders and projectors: open_clip <-> transformers CLIP parity, layer/feature selection, freezing,
LIMU-BERT checkpoints named as the original code names them, refusal of unsafe pickles, projector keys."""
import json, math, os, subprocess, sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
from qllava.core import CheckpointError, ConfigError
from qllava.modeling.encoders import (HFClipEncoder, LimuBert, OpenClipEncoder, build_encoder, convert_open_clip_to_hf_clip,
                             load_weights_file, resolve_spec)
from qllava.modeling.projector import build_projector, infer_projector

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- open_clip <-> transformers CLIP parity
def _tiny_open_clip(act="quick_gelu", seed=0):
    from open_clip.transformer import QuickGELU, VisionTransformer
    torch.manual_seed(seed)
    return VisionTransformer(image_size=48, patch_size=16, width=48, layers=3, heads=4, mlp_ratio=4.0, output_dim=24,
                             act_layer=QuickGELU if act == "quick_gelu" else torch.nn.GELU).eval()


def _parity(visual, x, layers):
    "Max |open_clip - converted| over the selected layers (cls_patch, which contains patch); also checks shapes."
    hf = convert_open_clip_to_hf_clip(visual)
    worst = 0.0
    with torch.no_grad():
        for layer in layers:
            a = OpenClipEncoder(visual, "oc", layer, "cls_patch")(x)
            b = HFClipEncoder(hf, "hf", layer, "cls_patch")(x)
            c = hf.config
            assert a.shape == b.shape == (x.shape[0], (c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)
            worst = max(worst, (a - b).abs().max().item())
        # the pooled, projected embedding agrees too (ln_post -> post_layernorm)
        worst = max(worst, (hf(x).pooler_output @ visual.proj - visual(x)).abs().max().item())
    return hf, worst


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_tiny_open_clip_matches_converted_hf_clip(act):
    visual = _tiny_open_clip(act)
    x = torch.randn(3, 3, 48, 48)
    hf, worst = _parity(visual, x, layers=[-1, -2, 0, 1])
    assert hf.config.hidden_act == act
    assert (hf.config.hidden_size, hf.config.num_hidden_layers, hf.config.num_attention_heads,
            hf.config.patch_size, hf.config.image_size, hf.config.intermediate_size) == (48, 3, 4, 16, 48, 192)
    assert worst < 1e-5, worst


def test_vit_b32_open_clip_matches_converted_hf_clip():
    "Acceptance: an open_clip ViT-B/32-shaped tower (QuiltNet-B-32's architecture, random init) and its conversion."
    import open_clip
    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    hf, worst = _parity(visual, x, layers=[-2])  # LLaVA's default layer; the pooled check covers the last block and ln_post
    c = hf.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.patch_size, c.image_size) == (768, 12, 12, 32, 224)
    assert c.hidden_act == "gelu"  # open_clip's ViT-B-32 config has no quick_gelu flag (ViT-B-32-quickgelu does)
    print(f"ViT-B/32 parity max abs diff {worst:.2e}")
    assert worst < 1e-5, worst
    # the encoder built from the spec string declares the same shapes
    enc = build_encoder("open_clip:ViT-B-32")
    assert (enc.hidden_size, enc.num_tokens, enc.media["image_size"], enc.select_layer) == (768, 49, 224, -2)


def test_converted_tower_saves_and_reloads_with_transformers(tmp_path):
    from transformers import CLIPVisionModel
    visual = _tiny_open_clip()
    hf = convert_open_clip_to_hf_clip(visual)
    hf.save_pretrained(tmp_path / "hf")
    enc = build_encoder(f"hf-clip:{tmp_path / 'hf'}")
    x = torch.randn(2, 3, 48, 48)
    assert torch.allclose(enc(x), OpenClipEncoder(visual, "oc")(x), atol=1e-5)


def test_conversion_refuses_what_clip_cannot_represent():
    from open_clip.transformer import VisionTransformer
    v = VisionTransformer(image_size=32, patch_size=8, width=32, layers=1, heads=4, mlp_ratio=2.0, ls_init_value=0.1)
    with pytest.raises(ConfigError, match="layer scale"):
        convert_open_clip_to_hf_clip(v)


# ---------------------------------------------------------------- spec strings and loading
def test_spec_aliases():
    assert resolve_spec("openai/clip-vit-large-patch14-336") == ("hf-clip", "openai/clip-vit-large-patch14-336")
    assert resolve_spec("wisdomik/QuiltNet-B-32") == ("open_clip", "hf-hub:wisdomik/QuiltNet-B-32")
    assert resolve_spec("limu-bert:/x/limu.pt") == ("limu-bert", "/x/limu.pt")
    with pytest.raises(ConfigError, match="names no model"):
        resolve_spec("hf-clip:")


def test_hub_ids_fail_fast_and_clearly_offline():
    with pytest.raises(CheckpointError, match="download it once"):
        build_encoder("wisdomik/QuiltNet-B-32")
    with pytest.raises(CheckpointError, match="cannot load a transformers CLIP vision model"):
        build_encoder("qllava-test/no-such-clip")


def test_open_clip_local_checkpoint(tmp_path):
    "open_clip:ARCH@file with a full CLIP state dict (visual.* keys), as open_clip saves them."
    import open_clip
    cfg_dir = tmp_path / "cfg"; cfg_dir.mkdir()
    (cfg_dir / "qllava-tiny-vit.json").write_text(json.dumps({"embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(3)
    model = open_clip.create_model("qllava-tiny-vit", pretrained=None).eval()
    torch.save(model.state_dict(), tmp_path / "tiny.bin")
    enc = build_encoder(f"open_clip:qllava-tiny-vit@{tmp_path / 'tiny.bin'}", select_layer=-1, select_feature="cls_patch")
    x = torch.randn(2, 3, 32, 32)
    ref = model.visual.transformer(model.visual._embeds(x))  # open_clip's own trunk
    assert torch.allclose(enc(x), ref, atol=1e-6)
    with pytest.raises(CheckpointError, match="not an open_clip ViT-B-32 checkpoint"):
        build_encoder(f"open_clip:ViT-B-32@{tmp_path / 'tiny.bin'}")
    with pytest.raises(ConfigError, match="unknown open_clip architecture"):
        build_encoder("open_clip:ViT-Nope@/x.bin")


def test_hf_clip_folder_reads_its_preprocessing(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=32, patch_size=8)).save_pretrained(tmp_path)
    CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], crop_size=32).save_pretrained(tmp_path)
    enc = build_encoder(str(tmp_path))
    assert enc.spec == f"hf-clip:{tmp_path}"
    assert enc.media == {"image_size": 32, "image_mean": (0.1, 0.2, 0.3), "image_std": (0.4, 0.5, 0.6)}
    pytest.importorskip("qllava.data.media")
    assert enc.processor.image_size == 32 and enc.processor.mean == (0.1, 0.2, 0.3)


# ---------------------------------------------------------------- layer / feature selection and freezing
@pytest.mark.parametrize("spec,shape_in,n_patch,hidden,n_blocks", [
    ("preset:tiny-clip", (3, 64, 64), 16, 64, 3),
    ("preset:tiny-limu", (100, 6), 100, 72, 4),
])
def test_select_layer_and_feature(spec, shape_in, n_patch, hidden, n_blocks):
    x = torch.randn(2, *shape_in)
    is_image = len(shape_in) == 3
    outs = {}
    for layer in range(-(n_blocks + 1), n_blocks + 1):
        for feat in ("patch", "cls_patch"):
            enc = build_encoder(spec, select_layer=layer, select_feature=feat)
            n = n_patch + (is_image and feat == "cls_patch")
            assert enc.num_tokens == n and enc.hidden_size == hidden
            y = enc(x)
            assert y.shape == (2, n, hidden)
            outs[layer, feat] = y
    assert torch.equal(outs[-1, "patch"], outs[n_blocks, "patch"])  # python indexing over [emb, block 1..L]
    assert not torch.allclose(outs[-1, "patch"], outs[-2, "patch"])
    if is_image: assert torch.equal(outs[-2, "cls_patch"][:, 1:], outs[-2, "patch"])
    with pytest.raises(ConfigError, match="outside this tower"):
        build_encoder(spec, select_layer=n_blocks + 1)
    with pytest.raises(ConfigError, match="select_feature"):
        build_encoder(spec, select_feature="cls")


def test_open_clip_preset(tiny_open_clip_preset):
    enc = build_encoder(tiny_open_clip_preset)
    assert isinstance(enc, OpenClipEncoder) and (enc.num_tokens, enc.hidden_size, enc.media["image_mean"]) == (16, 32, (0.5,) * 3)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(enc(x), build_encoder(tiny_open_clip_preset)(x))  # fixed seed
    assert torch.allclose(HFClipEncoder(enc.as_hf_clip(), "hf")(x), enc(x), atol=1e-5)


def test_default_layers():
    assert build_encoder("preset:tiny-clip").select_layer == -2      # LLaVA
    assert build_encoder("preset:tiny-limu").select_layer == -1      # LLaSA feeds LIMU-BERT's final output


def test_hf_clip_selection_matches_transformers_hidden_states():
    enc = build_encoder("preset:tiny-clip", select_layer=-2, select_feature="patch")
    x = torch.randn(2, 3, 64, 64)
    ref = enc.tower(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert torch.equal(enc(x), ref)


@pytest.fixture
def tiny_open_clip_preset(tmp_path):
    "A preset file describing a small open_clip ViT (kind open_clip)."
    p = tmp_path / "tiny-open-clip.json"
    p.write_text(json.dumps({"name": "tiny-open-clip", "kind": "open_clip", "seed": 0,
                             "config": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 4, "mlp_ratio": 2.0,
                                        "output_dim": 16, "quick_gelu": True},
                             "preprocessing": {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    return f"preset:{p}"


@pytest.mark.parametrize("spec", ["preset:tiny-clip", "preset:tiny-limu", "open_clip_preset"])
def test_frozen_by_default_trainable_on_request(spec, tiny_open_clip_preset):
    if spec == "open_clip_preset": spec = tiny_open_clip_preset
    enc = build_encoder(spec)
    x = enc.dummy_input(2).normal_()
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert all(not m.training for m in enc.modules() if m is not enc)  # dropout stays off inside a training model
    y = enc(x)
    assert not y.requires_grad
    enc.unfreeze().train()
    assert all(p.requires_grad for p in enc.parameters()) and all(m.training for m in enc.modules())
    enc(x).float().pow(2).mean().backward()
    assert sum(p.grad is not None for p in enc.parameters()) > 0
    enc.freeze()
    assert not any(p.requires_grad for p in enc.parameters()) and not any(m.training for m in enc.modules() if m is not enc)
    t = build_encoder(spec, trainable=True)
    assert t.trainable and all(p.requires_grad for p in t.parameters())


def test_wrong_media_shape_is_a_clear_error():
    enc = build_encoder("preset:tiny-clip")
    with pytest.raises(ConfigError, match=r"expects \(B, 3, 64, 64\)"):
        enc(torch.randn(1, 3, 32, 32))


# ---------------------------------------------------------------- LIMU-BERT checkpoints
def _original_limu_state_dict(hidden=72, feature_num=6, seq_len=120, hidden_ff=144, seed=0):
    "A LIMUBertModel4Pretrain state dict, keyed exactly as the original code names its tensors."
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2
    sd = {"transformer.embed.lin.weight": r(hidden, feature_num), "transformer.embed.lin.bias": r(hidden),
          "transformer.embed.pos_embed.weight": r(seq_len, hidden),
          "transformer.embed.norm.gamma": 1 + r(hidden), "transformer.embed.norm.beta": r(hidden)}
    for n in ("q", "k", "v"):
        sd[f"transformer.attn.proj_{n}.weight"], sd[f"transformer.attn.proj_{n}.bias"] = r(hidden, hidden), r(hidden)
    sd.update({"transformer.proj.weight": r(hidden, hidden), "transformer.proj.bias": r(hidden),
               "transformer.norm1.gamma": 1 + r(hidden), "transformer.norm1.beta": r(hidden),
               "transformer.pwff.fc1.weight": r(hidden_ff, hidden), "transformer.pwff.fc1.bias": r(hidden_ff),
               "transformer.pwff.fc2.weight": r(hidden, hidden_ff), "transformer.pwff.fc2.bias": r(hidden),
               "transformer.norm2.gamma": 1 + r(hidden), "transformer.norm2.beta": r(hidden),
               # pretraining head: not part of the encoder
               "fc.weight": r(hidden, hidden), "fc.bias": r(hidden), "linear.weight": r(hidden, hidden), "linear.bias": r(hidden),
               "norm.gamma": 1 + r(hidden), "norm.beta": r(hidden), "decoder.weight": r(feature_num, hidden), "decoder.bias": r(feature_num)})
    return sd


def _reference_limu(sd, x, n_layers=4, n_heads=4, p="transformer."):
    "LIMU-BERT's forward written out from its description: TF-style layer norm, one shared block applied n_layers times."
    def ln(h, name):
        u = h.mean(-1, keepdim=True); s = (h - u).pow(2).mean(-1, keepdim=True)
        return sd[p + name + ".gamma"] * (h - u) / torch.sqrt(s + 1e-12) + sd[p + name + ".beta"]
    lin = lambda h, name: h @ sd[p + name + ".weight"].T + sd[p + name + ".bias"]
    gelu = lambda h: h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
    e = ln(lin(x, "embed.lin"), "embed.norm") + sd[p + "embed.pos_embed.weight"][: x.shape[1]]
    h = ln(e, "embed.norm")
    B, T, H = h.shape
    for _ in range(n_layers):
        q, k, v = (lin(h, f"attn.proj_{n}").view(B, T, n_heads, -1).transpose(1, 2) for n in "qkv")
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1]), -1)
        h = (a @ v).transpose(1, 2).reshape(B, T, H)
        h = ln(h + lin(h, "proj"), "norm1")
        h = ln(h + lin(gelu(lin(h, "pwff.fc1")), "pwff.fc2"), "norm2")
    return h


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_limu_bert_checkpoint_round_trip(tmp_path, suffix):
    sd = _original_limu_state_dict()
    path = tmp_path / f"limu_bert{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    enc = build_encoder(f"limu-bert:{path}")
    assert (enc.modality, enc.hidden_size, enc.num_tokens, enc.media["window"], enc.media["channels"]) == ("sensor", 72, 120, 120, 6)
    x = torch.randn(3, 120, 6)
    ref = _reference_limu(sd, x)
    assert torch.allclose(enc(x), ref, atol=1e-5), (enc(x) - ref).abs().max()
    # weights went in under our names and come back out equal
    ours = enc.limu.state_dict()
    assert torch.equal(ours["norm1.weight"], sd["transformer.norm1.gamma"])
    assert torch.equal(ours["attn.proj_q.bias"], sd["transformer.attn.proj_q.bias"])
    # an earlier pass, as select_layer asks
    assert torch.allclose(build_encoder(f"limu-bert:{path}", select_layer=2)(x), _reference_limu(sd, x, n_layers=2), atol=1e-5)


def test_limu_bert_llasa_tower_and_classifier_prefixes(tmp_path):
    "LLaSA wraps the encoder in nn.Sequential (keys '0.embed...'); BERTClassifier adds 'classifier.*'."
    sd = _original_limu_state_dict(seed=1)
    seq = {k.replace("transformer.", "0."): v for k, v in sd.items() if k.startswith("transformer.")}
    torch.save(seq, tmp_path / "llasa_tower.pt")
    cls = {**{k: v for k, v in sd.items() if k.startswith("transformer.")}, "classifier.lin0.weight": torch.zeros(3, 72)}
    torch.save({"state_dict": cls}, tmp_path / "classifier.pt")
    x = torch.randn(2, 120, 6)
    ref = _reference_limu(sd, x)
    for f in ("llasa_tower.pt", "classifier.pt"):
        assert torch.allclose(build_encoder(f"limu-bert:{tmp_path / f}")(x), ref, atol=1e-5)


def test_limu_bert_incomplete_checkpoint(tmp_path):
    sd = _original_limu_state_dict()
    del sd["transformer.norm2.gamma"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="norm2.weight"):
        build_encoder(f"limu-bert:{tmp_path / 'broken.pt'}")
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="embed.lin.weight"):
        build_encoder(f"limu-bert:{tmp_path / 'other.pt'}")


# ---------------------------------------------------------------- unsafe pickles
class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_unsafe_pickle_is_refused(tmp_path):
    sd = _original_limu_state_dict()
    sd["transformer.extra"] = _Payload()
    torch.save(sd, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as e:
        build_encoder(f"limu-bert:{tmp_path / 'evil.pt'}")
    msg = str(e.value)
    assert "evil.pt" in msg and "refused to load" in msg and "safetensors" in msg and "system" in msg
    (tmp_path / "garbage.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_weights_file(tmp_path / "garbage.bin")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        build_encoder(f"limu-bert:{tmp_path / 'missing.pt'}")


# ---------------------------------------------------------------- processors
def test_processors_match_the_towers():
    media = pytest.importorskip("qllava.data.media")
    import numpy as np
    from PIL import Image
    img = build_encoder("preset:tiny-clip")
    assert isinstance(img.processor, media.ImageProcessor)
    assert img(img.processor([Image.new("RGB", (90, 40)), Image.new("RGB", (40, 90))])).shape == (2, 16, 64)
    sen = build_encoder("preset:tiny-limu")
    assert isinstance(sen.processor, media.SensorProcessor) and sen.processor.window == 100 and sen.processor.channels == 6
    assert sen(sen.processor(np.random.randn(100, 6).astype(np.float32))[None]).shape == (1, 100, 72)


# ---------------------------------------------------------------- projectors
@pytest.mark.parametrize("kind,keys", [
    ("linear", ["weight", "bias"]),
    ("mlp1x_gelu", ["0.weight", "0.bias"]),
    ("mlp2x_gelu", ["0.weight", "0.bias", "2.weight", "2.bias"]),
    ("mlp3x_gelu", ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]),
])
def test_projector_keys_and_shapes(kind, keys):
    p = build_projector(kind, 72, 64)
    assert list(p.state_dict()) == keys  # as LLaVA's builder: model.mm_projector.<key>
    assert p(torch.randn(2, 120, 72)).shape == (2, 120, 64)
    assert infer_projector({f"model.mm_projector.{k}": v for k, v in p.state_dict().items()}) == (kind, 72, 64)


def test_projector_mlp2x_is_linear_gelu_linear():
    p = build_projector("mlp2x_gelu", 8, 4)
    x = torch.randn(3, 8)
    ref = F.linear(F.gelu(F.linear(x, p[0].weight, p[0].bias)), p[2].weight, p[2].bias)
    assert torch.allclose(p(x), ref)


def test_projector_errors():
    assert list(build_projector("identity", 16, 16).state_dict()) == []
    with pytest.raises(ConfigError, match="identity projector needs"):
        build_projector("identity", 16, 32)
    with pytest.raises(ConfigError, match="linear, mlpNx_gelu, identity"):
        build_projector("mlp0x_gelu", 16, 32)
    with pytest.raises(ConfigError, match="unknown projector kind 'resampler'"):
        build_projector("resampler", 16, 32)


# ---------------------------------------------------------------- import hygiene
def test_importing_encoders_does_not_import_open_clip():
    code = ("import sys, qllava.modeling.encoders, qllava.modeling.projector; "
            "assert 'open_clip' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------- the encoder registry
REGISTRY_CODE = """
import json
from qllava.modeling.encoders import resolve_spec, encoder_modality, encoder_num_tokens, encoder_media, build_encoder
out = {}
for spec in ("someone/pathology-tower", "someone/vision-model", "wisdomik/QuiltNet-B-99"):
    out[spec] = list(resolve_spec(spec))
for spec in ("someone/pathology-tower", "someone/vision-model"):
    e = build_encoder(spec, select_feature="cls_patch")
    out[spec] += [encoder_modality(spec), encoder_num_tokens(spec, None, "cls_patch"), e.num_tokens, encoder_media(spec) == e.media]
print("RESULT " + json.dumps(out))
"""


def test_bare_hub_ids_are_recognised_by_their_files_not_their_names(tmp_path):
    "The testbed's QuiltNet-B-32 and CLIP-L/336 repositories under names that say nothing: told apart by open_clip_config.json / config.json."
    from qllava.testing.testbed import clip_l336_files, quiltnet_files, run_with_testbed, write_hub_repo
    cache = tmp_path / "hub"
    write_hub_repo(cache, "someone/pathology-tower", quiltnet_files())
    write_hub_repo(cache, "someone/vision-model", clip_l336_files())
    r = run_with_testbed(cache, REGISTRY_CODE, timeout=600)
    out = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert out["someone/pathology-tower"] == ["open_clip", "hf-hub:someone/pathology-tower", "image", 50, 50, True]
    assert out["someone/vision-model"] == ["hf-clip", "someone/vision-model", "image", 577, 577, True]
    assert out["wisdomik/QuiltNet-B-99"] == ["hf-clip", "wisdomik/QuiltNet-B-99"]   # a word in the name decides nothing


def test_bare_folders_and_files_are_recognised_by_their_files(tmp_path):
    from qllava.testing.testbed import quiltnet_files
    from qllava.modeling.encoders import encoder_modality, encoder_num_tokens
    oc = tmp_path / "clip-like-name"; oc.mkdir()           # an open_clip folder whose name says CLIP
    for n, b in quiltnet_files().items(): (oc / n).write_bytes(b.encode() if isinstance(b, str) else b)
    assert resolve_spec(str(oc)) == ("open_clip", f"local-dir:{oc.resolve()}")
    assert encoder_num_tokens(str(oc)) == build_encoder(str(oc)).num_tokens == 49
    limu = tmp_path / "imu.safetensors"                    # a LIMU-BERT checkpoint, told by its tensor names
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in _original_limu_state_dict().items()}, str(limu))
    assert resolve_spec(str(limu)) == ("limu-bert", str(limu.resolve()))
    assert (encoder_modality(str(limu)), encoder_num_tokens(str(limu))) == ("sensor", 120)
    torch.save({"w": torch.ones(2)}, tmp_path / "limu-weights.pt")   # 'limu' in its name, no LIMU-BERT tensors
    with pytest.raises(ConfigError, match="limu-bert:"):
        resolve_spec(str(tmp_path / "limu-weights.pt"))


def test_register_encoder_kind_needs_no_library_edit(tmp_path):
    "A 1-D toy tower as a new kind: its specs build, count tokens, preprocess and resolve (bare files by content) like the built-in ones."
    from qllava.modeling.encoders import (ENCODER_KINDS, Encoder, encoder_media, encoder_modality, encoder_num_tokens, encoder_processor,
                                 register_encoder_kind)

    class Conv1d(Encoder):
        def __init__(self, spec, window, select_layer, select_feature):
            super().__init__(spec, "sensor", 8, window // 4, dict(window=window, channels=6), select_layer, select_feature)
            self.conv = torch.nn.Conv1d(6, 8, 4, stride=4)
        def features(self, x): return self.conv(x.transpose(1, 2)).transpose(1, 2)

    def window(target): return json.loads(Path(target).read_text())["window"]
    kind = register_encoder_kind(
        "toy-conv", build=lambda target, spec, select_layer, select_feature, **_: Conv1d(spec, window(target), select_layer, select_feature),
        modality="sensor", syntax="toy-conv:CONFIG.json",
        recognise=lambda s: str(Path(s).resolve()) if s.endswith(".json") and Path(s).is_file() and "window" in Path(s).read_text() else None,
        num_tokens=lambda target, select_layer, select_feature: window(target) // 4,
        media=lambda target: dict(window=window(target), channels=6))
    try:
        cfg = tmp_path / "tower.json"; cfg.write_text(json.dumps({"window": 40}))
        assert resolve_spec(str(cfg)) == ("toy-conv", str(cfg.resolve()))
        enc = build_encoder(f"toy-conv:{cfg}")
        assert (enc.spec, enc.num_tokens, enc(torch.randn(2, 40, 6)).shape) == (f"toy-conv:{cfg.resolve()}", 10, (2, 10, 8))
        assert (encoder_modality(str(cfg)), encoder_num_tokens(str(cfg)), encoder_media(str(cfg))) == ("sensor", 10, enc.media)
        assert encoder_processor(str(cfg)).window == 40
        with pytest.raises(ConfigError, match="toy-conv:CONFIG.json"):
            resolve_spec("no such thing")
    finally:
        ENCODER_KINDS.pop(kind.name)


def test_token_counts_without_building_agree_with_the_towers():
    from qllava.modeling.encoders import encoder_media, encoder_num_tokens
    for spec in ("preset:tiny-clip", "preset:tiny-limu", "preset:bench-vit-b32", "preset:limu-bert"):
        for layer, feat in ((None, "patch"), (-1, "cls_patch"), (0, "patch")):
            e = build_encoder(spec, layer, feat)
            assert encoder_num_tokens(spec, layer, feat) == e.num_tokens, (spec, layer, feat)
        assert encoder_media(spec) == e.media
    with pytest.raises(ConfigError, match="select_feature"):
        encoder_num_tokens("preset:tiny-clip", select_feature="cls")
