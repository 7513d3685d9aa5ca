"""The embedded default: shipped tokenizers, presets and demo data are rebuilt byte-identically, and the demo data are sane."""
import json, os, re
from collections import Counter
from pathlib import Path

import pytest

os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
from qllava.core import assets_dir
from qllava.data.presets import demo_paths, load_tokenizer, get_preset

MODALITIES = ["pathology", "imu"]


def _jsonl(p): return [json.loads(l) for l in Path(p).read_text().splitlines() if l.strip()]


def _yes_no(text):
    "The verdict of a closed answer: its first word (\"Yes, ...\") or its last (\"..., so yes.\")."
    words = [w for w in re.split(r"[\s,.]+", text.strip().lower()) if w]
    return next((w for w in (words[0], words[-1]) if w in ("yes", "no")), None) if words else None


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    from qllava.testing.demo import make_demo
    out = tmp_path_factory.mktemp("assets")
    make_demo(out)
    return out


def test_rebuild_is_byte_identical_to_shipped(rebuilt):
    built = sorted(p.relative_to(rebuilt) for p in rebuilt.rglob("*") if p.is_file())
    assert any(str(p).startswith("tokenizers/llama-demo") for p in built)
    assert any(str(p).startswith("demo/pathology/images") for p in built)
    # every file byte for byte, except PNGs: their pixels (zlib's compressed bytes may vary with Pillow's zlib build)
    import numpy as np
    from PIL import Image
    same = lambda p: ((rebuilt / p).read_bytes() == (assets_dir() / p).read_bytes() if p.suffix != ".png" else
                      np.array_equal(np.asarray(Image.open(rebuilt / p)), np.asarray(Image.open(assets_dir() / p))))
    different = [str(p) for p in built if not same(p)]
    assert not different, f"rebuilt files differ from the shipped ones: {different[:10]}"
    pngs = [p for p in built if p.suffix == ".png"]
    assert len(pngs) > 200
    # and nothing stale is shipped beside them
    for sub in ["tokenizers", "demo", "presets"]:
        # llama2-spm is not make-demo's: qllava.testing.testbed builds it from llama-cpp-python's gguf (tests/test_testbed.py checks it)
        shipped = {p.relative_to(assets_dir()) for p in (assets_dir() / sub).rglob("*") if p.is_file()
                   and not str(p.relative_to(assets_dir())).startswith("tokenizers/llama2-spm/")}
        assert shipped == {p for p in built if str(p).startswith(sub + "/")}, sub


def test_demo_size_is_small():
    total = sum(p.stat().st_size for p in (assets_dir() / "demo").rglob("*") if p.is_file())
    assert total < 6e6, total


@pytest.mark.parametrize("modality", MODALITIES)
def test_records_reference_existing_media_and_placeholders_match(modality):
    p = demo_paths(modality)
    key, ph = p["media_key"], "<image>" if p["media_key"] == "image" else "<sensor>"
    for split in ["pretrain", "finetune"]:
        recs = json.loads(p[split].read_text())
        assert len({r["id"] for r in recs}) == len(recs)
        for r in recs:
            conv = r["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and conv
            n_ph = sum(t["value"].count(ph) for t in conv)
            if key in r:
                assert (p["media_folder"] / r[key]).is_file(), r[key]
                assert n_ph == 1 and conv[0]["value"].startswith(ph + "\n"), r["id"]
            else:
                assert n_ph == 0 and split == "finetune", r["id"]
            assert all(t["value"].strip() for t in conv)
    ft = json.loads(p["finetune"].read_text())
    text_only = sum(key not in r for r in ft) / len(ft)
    assert 0.07 < text_only < 0.13, text_only
    for q in _jsonl(p["eval_questions"]):
        assert (p["media_folder"] / q[key]).is_file(), q[key]


@pytest.mark.parametrize("modality", MODALITIES)
def test_yes_no_balanced_in_train_and_eval(modality):
    p = demo_paths(modality)
    # train: overall and per question wording, so the wording alone predicts nothing
    per_q, total = Counter(), Counter()
    for r in json.loads(p["finetune"].read_text()):
        c = r["conversations"]
        for h, g in zip(c[::2], c[1::2]):
            yn = _yes_no(g["value"])
            if yn and h["value"].rstrip().endswith("?") and p["media_key"] in r:
                per_q[(h["value"].split("\n")[-1], yn)] += 1; total[yn] += 1
    assert total["yes"] > 20 and abs(total["yes"] - total["no"]) <= 0.05 * sum(total.values()), total
    for q in {q for q, _ in per_q}:
        y, n = per_q[(q, "yes")], per_q[(q, "no")]
        assert abs(y - n) <= max(2, 0.15 * (y + n)), (q, y, n)
    gt = json.loads(p["eval_gt"].read_text())
    closed = [g for g in gt if g["answer_type"] == "CLOSED"]
    assert len(closed) >= 20
    c = Counter(g["answer"] for g in closed)
    assert c["yes"] == c["no"] and set(c) == {"yes", "no"}
    assert all(g["yes_no_answer"] == g["answer"] for g in closed)


@pytest.mark.parametrize("modality", MODALITIES)
def test_eval_files_share_question_ids(modality):
    p = demo_paths(modality)
    qs = _jsonl(p["eval_questions"])
    ids = [q["question_id"] for q in qs]
    assert len(set(ids)) == len(ids)
    assert [g["id"] for g in json.loads(p["eval_gt"].read_text())] == ids
    assert [c["question_id"] for c in _jsonl(p["eval_captions"])] == ids
    refs = _jsonl(p["eval_reference_answers"])
    assert [r["question_id"] for r in refs] == ids
    assert all(r["model_id"] == "reference" and set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for r in refs)
    assert {q["category"] for q in qs} <= {"conv", "detail"}
    for g in json.loads(p["eval_gt"].read_text()):
        assert g["answer_type"] in ("OPEN", "CLOSED") and g["answer"]


def test_pathology_eval_tiles_disjoint_from_train():
    p = demo_paths("pathology")
    pos = lambda name: tuple(int(v) for v in re.match(r".*/y(\d+)_x(\d+)", name).groups())
    train = {pos(r["image"]) for f in ["pretrain", "finetune"] for r in json.loads(p[f].read_text()) if "image" in r}
    evals = {pos(q["image"]) for q in _jsonl(p["eval_questions"])}
    assert len(train) >= 100 and len(evals) >= 30
    overlap = lambda a, b: abs(a[0] - b[0]) < 64 and abs(a[1] - b[1]) < 64
    assert not any(overlap(a, b) for a in train for b in evals)
    assert all(q["image"].startswith("eval/") for q in _jsonl(p["eval_questions"]))


def test_pathology_images_and_imu_windows():
    import numpy as np
    from PIL import Image
    p = demo_paths("pathology")
    for f in sorted(p["media_folder"].rglob("*.png"))[:20]:
        im = Image.open(f); assert im.size == (64, 64) and im.mode == "RGB"
    q = demo_paths("imu")
    files = sorted(q["media_folder"].rglob("*.npy"))
    assert len(files) == 80
    for f in files:
        x = np.load(f); assert x.shape == (100, 6) and x.dtype == np.float32 and np.isfinite(x).all()
    assert get_preset("tiny-limu")["config"]["seq_len"] == 100
    # IMU eval comes from aeon's test split, training from its train split
    assert all(r["sensor"].startswith("train/") for r in json.loads(q["finetune"].read_text()) if "sensor" in r)
    assert all(r["sensor"].startswith("eval/") for r in _jsonl(q["eval_questions"]))


@pytest.mark.parametrize("name", ["llama-demo", "bytebpe-demo"])
def test_tokenizers_cover_demo_text(name):
    tok = load_tokenizer(name)
    texts = []
    for m in MODALITIES:
        for r in json.loads(demo_paths(m)["finetune"].read_text()): texts += [t["value"] for t in r["conversations"]]
    enc = tok(texts, add_special_tokens=False).input_ids
    if tok.unk_token_id is not None: assert all(tok.unk_token_id not in e for e in enc)
    assert all(tok.decode(e) == t for e, t in zip(enc[:200], texts[:200]))
    # demo text is what the vocabulary was trained on: few pieces per word
    n_words = sum(len(t.split()) for t in texts); n_tok = sum(map(len, enc))
    assert n_tok < 2.2 * n_words, (n_tok, n_words)


def test_tokenizer_special_ids():
    t = load_tokenizer("llama-demo")
    assert (t.unk_token_id, t.bos_token_id, t.eos_token_id, t.pad_token_id) == (0, 1, 2, 3)
    assert t.convert_tokens_to_ids("<0x0A>") == 4 + 10
    assert t("x").input_ids[0] == 1 and t("x").input_ids[-1] != 2
    assert len(t) == get_preset("tiny-llama")["config"]["vocab_size"]
    b = load_tokenizer("bytebpe-demo")
    assert b.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert b.eos_token_id == b.pad_token_id == 0 and b.bos_token_id is None
