"""`import_llava` of an ORIGINAL-format LLaVA-1.5 checkpoint gives the original's prompt ids, pixels and logits.

The fixture `tests/parity/llava_model/` was made by the original code (haotian-liu/LLaVA as `llava-torch==1.2.2.post1`,
transformers 4.37.2) with `tests/parity/make_llava_model_fixture.sh`: a tiny seeded checkpoint saved as the original saves
a finetuned model, and what `llava/eval/model_vqa.py`'s path gives for a square (70x70) and a non-square (80x48) image
(float32, CPU). Here qllava imports that checkpoint and runs its own prompt encoding, image processor and forward.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests/parity/llava_model"
CKPT, CLIP = FIX / "llava-v1.5-tiny", FIX / "clip-vit-tiny"
IMAGE_TOKEN_INDEX = -200
TOL = 1e-5

pytestmark = pytest.mark.skipif(not (FIX / "original_outputs.safetensors").is_file(),
                                reason="model parity fixture missing (bash tests/parity/make_llava_model_fixture.sh)")


@pytest.fixture(scope="module")
def original():
    meta = json.loads((FIX / "original_outputs.json").read_text())
    return meta, load_file(str(FIX / "original_outputs.safetensors"))


@pytest.fixture(scope="module")
def imported():
    from qllava.modeling.checkpoint import import_llava
    model, tok = import_llava(CKPT, encoder=f"hf-clip:{CLIP}")
    return model.float().eval(), tok


def collapse(ids, media_id):
    "Our ids with each run of the media token collapsed to one IMAGE_TOKEN_INDEX (the original's form)."
    out = []
    for t in ids:
        if t == media_id:
            if out and out[-1] == IMAGE_TOKEN_INDEX: continue
            out.append(IMAGE_TOKEN_INDEX)
        else: out.append(t)
    return out


def run_ours(model, tok, case, pixels=None):
    "qllava's prompt, ids (expanded), pixels and logits for one fixture case."
    from PIL import Image
    from qllava.data.conversation import generation_prompt
    from qllava.modeling.generate import encode_prompts
    prompt = generation_prompt(model.config.template, "<image>\n" + case["question"])
    ids, mask = encode_prompts(tok, [prompt], model.config)
    if pixels is None:
        with Image.open(FIX / case["image"]) as im: pixels = model.encoders["image"].processor(im.convert("RGB"))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, images=pixels[None]).logits[0].float()
    return prompt, ids[0], pixels, logits


@pytest.mark.parametrize("name", ["square", "wide"])
def test_import_llava_parity(original, imported, name):
    meta, ref = original
    case = meta["cases"][name]
    model, tok = imported
    mid, n = model.config.media_token_ids["image"], model.config.encoder_num_tokens["image"]
    assert n == case["n_image_features"] == 16
    prompt, ids, pixels, logits = run_ours(model, tok, case)
    assert prompt == case["prompt"]
    # prompt ids: ours repeat <image> N times where the original has one -200
    ref_ids = ref[f"{name}.input_ids"].tolist()
    assert collapse(ids.tolist(), mid) == ref_ids
    assert int((ids == mid).sum()) == n
    # pixels: pad to square with int(mean*255), resize, crop, normalise
    ref_px = ref[f"{name}.pixel_values"]
    assert pixels.shape == ref_px.shape
    px_diff = (pixels - ref_px).abs().max().item()
    assert px_diff <= 1e-6, f"pixels differ by {px_diff}"
    # ... and pixel for pixel: the 0..255 values before normalisation are the same (the rest is float32 rounding)
    m, s = (torch.tensor(v).view(3, 1, 1) for v in (meta["image_mean"], meta["image_std"]))
    assert torch.equal(((pixels * s + m) * 255).round(), ((ref_px * s + m) * 255).round())
    # logits: the original expands the image in place, so row i is the same position in both; the original's vocab
    # is the checkpoint's, ours has <image> / <sensor> appended after it
    ref_logits = ref[f"{name}.logits"]
    V = ref_logits.shape[1]
    assert logits.shape[0] == ref_logits.shape[0] and logits.shape[1] >= V
    pos = case["image_position"]
    text = torch.ones(logits.shape[0], dtype=torch.bool)
    text[pos:pos + n] = False
    d = (logits[:, :V] - ref_logits).abs()
    print(f"{name}: pixels {px_diff:.2e}, logits text {d[text].max().item():.2e}, image rows {d[~text].max().item():.2e}")
    assert d[text].max().item() <= TOL, f"text-position logits differ by {d[text].max().item()}"
    assert d.max().item() <= TOL, f"image-position logits differ by {d[~text].max().item()}"
    # the original's own pixels through our model: the model alone, independent of preprocessing
    _, _, _, logits2 = run_ours(model, tok, case, pixels=ref_px)
    assert (logits2[:, :V] - ref_logits).abs().max().item() <= TOL


def test_fixture_discriminates(original, imported):
    "The comparison would catch the usual mistakes: logits are O(1), the image matters, and a wrong select layer or a "
    "stretched (not padded) image moves the logits far past the tolerance."
    from PIL import Image
    from qllava.data.media import ImageProcessor
    meta, ref = original
    a, b = ref["square.logits"], ref["wide.logits"]
    assert a.std().item() > 0.5
    pa, pb = meta["cases"]["square"]["image_position"], meta["cases"]["wide"]["image_position"]
    assert pa == pb
    assert (a[pa + 16] - b[pa + 16]).abs().max().item() > 1e-2  # same text before, other image: other logits after it
    model, tok = imported
    case, R = meta["cases"]["wide"], ref["wide.logits"]
    V = R.shape[1]
    enc = model.encoders["image"]
    enc.select_layer = -1
    try: _, _, _, lg = run_ours(model, tok, case)
    finally: enc.select_layer = -2
    assert (lg[:, :V] - R).abs().max().item() > 100 * TOL
    p = enc.processor
    stretch = ImageProcessor(p.image_size, p.mean, p.std, aspect_ratio="resize")
    with Image.open(FIX / case["image"]) as im: px = stretch(im.convert("RGB"))
    _, _, _, lg = run_ours(model, tok, case, pixels=px)
    assert (lg[:, :V] - R).abs().max().item() > 100 * TOL


def test_import_llava_cli_default_tower(original, tmp_path, monkeypatch):
    "`qllava import-llava` with no --encoder resolves mm_vision_tower (relative to the working folder, as the original)."
    from qllava.modeling.checkpoint import import_llava_cli, load_model
    meta, ref = original
    monkeypatch.chdir(ROOT)
    assert import_llava_cli([str(CKPT), str(tmp_path / "out")]) == 0
    model, tok = load_model(tmp_path / "out")
    case = meta["cases"]["wide"]
    _, ids, _, logits = run_ours(model.float().eval(), tok, case)
    assert collapse(ids.tolist(), model.config.media_token_ids["image"]) == ref["wide.input_ids"].tolist()
    V = ref["wide.logits"].shape[1]
    assert (logits[:, :V] - ref["wide.logits"]).abs().max().item() <= TOL


def test_imported_checkpoint_loads_from_another_folder(tmp_path, monkeypatch):
    "An imported checkpoint does not depend on the working folder of the import."
    from qllava.modeling.checkpoint import import_llava_cli, load_model
    monkeypatch.chdir(ROOT)
    assert import_llava_cli([str(CKPT), str(tmp_path / "out")]) == 0
    monkeypatch.chdir(tmp_path)
    model, _ = load_model(tmp_path / "out")
    assert Path(model.config.encoders["image"].split(":", 1)[1]).is_absolute()
