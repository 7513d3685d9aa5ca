"""Checkpoints written by an older qllava (tests/fixtures/checkpoint_v1, made by `make_checkpoint_v1.py` at commit
151b618, before the issue-12 refactor) still load, to the same logits: the checkpoint format is a promise to users."""
import json
from pathlib import Path
import pytest, torch
# the flat layout's module names, as a script written for that version says them (qllava.core.FlatNames keeps them)
from qllava.checkpoint import load_model, load_projector, read_manifest
from qllava.generate import collect_media, encode_prompts
from qllava.model import build_model

FX = Path(__file__).parent / "fixtures" / "checkpoint_v1"
EXPECTED = json.loads((FX / "expected.json").read_text())

def probe(model, tok) -> dict:
    "Last-position logits of the recorded prompt with the recorded image: top 5 ids and values, as the fixture script wrote them."
    prompt = EXPECTED["prompt"]
    ids, mask = encode_prompts(tok, [prompt], model.config)
    media = {k: v.to(next(model.parameters()).dtype) for k, v in collect_media(model, [str(FX / EXPECTED["image"])], [prompt]).items()}
    with torch.no_grad(): logits = model(input_ids=ids, attention_mask=mask, media=media).logits[0, -1].float()
    top = logits.topk(5)
    return {"top_ids": top.indices.tolist(), "top_logits": [round(v, 4) for v in top.values.tolist()], "n_ids": ids.shape[1]}

def check(got:dict, want:dict):
    assert got["n_ids"] == want["n_ids"] and got["top_ids"] == want["top_ids"], (got, want)
    assert got["top_logits"] == pytest.approx(want["top_logits"], abs=2e-3), (got, want)

def test_full_checkpoint_loads_to_the_same_logits():
    assert read_manifest(FX / "full")["stage"] == "finetune"
    model, tok = load_model(FX / "full")
    check(probe(model, tok), EXPECTED["full"])

def test_lora_run_loads_to_the_same_logits():
    from qllava.checkpoint import load_trained
    check(probe(*load_trained(FX / "lora")), EXPECTED["lora"])

def test_stage1_projector_files_load_alike():
    "The pickle-free .safetensors and the original-format .bin of the same stage-1 projector give the same weights."
    a, _ = build_model("preset:tiny-llama", {"image": "preset:tiny-clip"})
    b, _ = build_model("preset:tiny-llama", {"image": "preset:tiny-clip"})
    load_projector(a, FX / "lora" / "mm_projector.safetensors"); load_projector(b, FX / "lora" / "mm_projector.bin")
    for (k, x), (_, y) in zip(a.projectors.state_dict().items(), b.projectors.state_dict().items()): assert torch.equal(x, y), k
