"""A saved checkpoint tokenizes exactly as its training did.

For the demo tokenizer, the real LLaMA-2 vocabulary (`llama2-spm`, as Vicuna v1.5 ships it, `legacy: false`), the
same vocabulary with `legacy: true`, and the byte-level tokenizer: the ids and labels of every demo record and of
the real-vocabulary record set, for every template, and the answer-time prompt ids, are equal before saving and
after reloading the checkpoint -- for a trained model's folder, a merged / imported one, and an exported
transformers Llava folder.
"""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import json, shutil
from pathlib import Path
import pytest, torch

from qllava.core import asset
from qllava.data.conversation import generation_prompt
from qllava.data.presets import demo_paths, load_tokenizer
from qllava.modeling.model import build_model
from qllava.modeling.checkpoint import save_checkpoint, load_model, export_hf
from qllava.modeling.generate import encode_prompts
from qllava.data.tokenize import tokenize_conversations

PARITY_RECORDS = Path(__file__).parent / "parity" / "records.json"
CHAT = ["vicuna_v1", "llama_2", "mistral_instruct", "llava_llama_2", "chatml"]


def records():
    "(name, records) of every record set: the demo's (both modalities) and the real-vocabulary set."
    out = []
    for mod in ("pathology", "imu"):
        d = demo_paths(mod)
        out += [(f"{mod}-pretrain", json.loads(d["pretrain"].read_text())), (f"{mod}-finetune", json.loads(d["finetune"].read_text()))]
    out.append(("realvocab", json.loads(PARITY_RECORDS.read_text())))
    return out


def tokenizer_folder(name, tmp_path):
    if name != "llama2-spm-legacy": return name
    d = tmp_path / "legacy"; d.mkdir()
    for f in ("tokenizer.model", "special_tokens_map.json"): shutil.copy(asset("tokenizers", "llama2-spm", f), d)
    cfg = json.loads(asset("tokenizers", "llama2-spm", "tokenizer_config.json").read_text()); cfg["legacy"] = True
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(d)


def everything(tok, config):
    "Every id the model would see: training ids + labels per template and record set, and answer prompts."
    n = {"image": 3, "sensor": 2}
    out = {}
    for name, recs in records():
        convs = [r["conversations"] for r in recs]
        templates = ["plain"] if name.endswith("pretrain") else CHAT
        if name == "realvocab": convs = [c for c in convs if len(c) == 2]; templates = ["plain"] + CHAT
        for t in templates:
            if t == "plain": cs = [c for c in convs if len(c) == 2 and "<" in c[0]["value"]]
            else: cs = convs
            out[(name, t)] = [(s.input_ids.tolist(), s.labels.tolist()) for s in tokenize_conversations(cs, tok, t, n, 2048)]
        q = [generation_prompt("vicuna_v1", c[0]["value"]) for c in convs[:50]]
        out[(name, "answer")] = encode_prompts(tok, q, config)[0].tolist()
    return out


@pytest.mark.parametrize("tokenizer", ["llama-demo", "llama2-spm", "llama2-spm-legacy", "bytebpe-demo"])
def test_save_reload_tokenizes_identically(tokenizer, tmp_path):
    # named: the byte-level vocabulary has no chat template and no </s>, so no template would be chosen for it
    model, tok = build_model("preset:tiny-llama", {"image": "preset:tiny-clip"}, tokenizer=tokenizer_folder(tokenizer, tmp_path),
                             seed=0, template="vicuna_v1")
    before = everything(tok, model.config)
    save_checkpoint(model, tmp_path / "ck", tokenizer=tok, stage="finetune")
    m2, tok2 = load_model(tmp_path / "ck")
    assert getattr(tok2, "legacy", None) == getattr(tok, "legacy", None)
    assert everything(tok2, m2.config) == before
    # a folder made from that checkpoint (what merge-lora / import-llava / stage 2 write) keeps it too
    save_checkpoint(m2, tmp_path / "again", tokenizer=tok2, stage="import")
    m3, tok3 = load_model(tmp_path / "again")
    assert everything(tok3, m3.config) == before
    # the exported transformers folder holds the same tokenizer
    export_hf(model, tmp_path / "hf", tokenizer=tok)
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert everything(hf_tok, model.config) == before


def test_legacy_changes_what_follows_a_special_token():
    "Why the flag matters: legacy=True puts a ▁ after </s>, legacy=False does not (Vicuna v1.5 is legacy=False)."
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        new = load_tokenizer("llama2-spm")
        old = load_tokenizer(tokenizer_folder("llama2-spm-legacy", Path(d)))
        text = "ok</s>USER: hi"
        assert new.convert_ids_to_tokens(new(text).input_ids)[2:4] == ["</s>", "USER"]
        assert old.convert_ids_to_tokens(old(text).input_ids)[2:4] == ["</s>", "▁US"]


def test_tokenizer_model_folder_without_sentencepiece_names_the_package(tmp_path):
    "A Vicuna-style folder (tokenizer.model only) on a machine without sentencepiece: the message names it."
    import subprocess, sys
    (tmp_path / "sentencepiece.py").write_text('raise ImportError("No module named sentencepiece")\n')  # as if not installed
    r = subprocess.run([sys.executable, "-c", "from qllava.data.presets import load_tokenizer; load_tokenizer('llama2-spm')"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode != 0 and "needs sentencepiece. Fix: pip install sentencepiece" in r.stderr
    assert "tiktoken" not in r.stderr
