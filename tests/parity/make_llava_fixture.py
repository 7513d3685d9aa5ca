#!/usr/bin/env python
"""Run the ORIGINAL LLaVA-1.5 data path (haotian-liu/LLaVA, PyPI `llava-torch==1.2.2.post1`) on records and write what it
yields: `input_ids` (IMAGE_TOKEN_INDEX -200 where it puts the image) and `labels` (-100 masked), per tokenizer x template.

Runs in the scratch venv made by `make_llava_fixture.sh`; imports nothing from qllava (it only reads files of the repo).

What is "the original path" here, per record: `llava.train.train.LazySupervisedDataset.__getitem__` itself, i.e.
`preprocess_multimodal(copy.deepcopy(...), data_args)` when the record has an "image" key, then
`preprocess(sources, tokenizer, has_image='image' in record)`. The only things stubbed are what a tokenisation fixture
does not need: the image processor (a stub returning a zero tensor) and the images (1x1 PNG placeholders written to a
temporary image_folder at every path the records name). `data_args` is the original `DataArguments` with what train()
sets for LLaVA-1.5: is_multimodal=True, mm_use_im_start_end=False, image_aspect_ratio='pad'.

Tokenizer and template set-up is what train() does for every version other than v0/v0.5:
    AutoTokenizer.from_pretrained(path, model_max_length=2048, padding_side="right", use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token
    conversation_lib.default_conversation = conversation_lib.conv_templates[version]
(no folder path contains 'mpt', so the use_fast=False branch is the one train() takes).

Imports: `import llava.train.train` pulls llava/__init__ -> llava.model (the LLaVA model classes, which need only
transformers) and llava.train.llava_trainer -> transformers.Trainer; with torch + transformers + Pillow installed these
all import. deepspeed / peft / bitsandbytes / flash-attn are imported only inside train() or by train_mem.py, which we
never call or import, so the modules are imported the ordinary way.
"""
import argparse, contextlib, copy, datetime, gzip, io, json, os, pathlib, platform, shutil, sys, tempfile
from importlib import metadata

import torch, transformers, tokenizers
from PIL import Image

import llava
from llava import conversation as conversation_lib
from llava.constants import IMAGE_TOKEN_INDEX, IGNORE_INDEX
from llava.train import train as llava_train
from llava.train.train import DataArguments, LazySupervisedDataset

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHAT_TEMPLATES = ["v1", "llava_llama_2", "mistral_instruct", "chatml_direct"]
TOKENIZERS = {"llama-demo": "qllava/assets/tokenizers/llama-demo", "llama2-spm": "qllava/assets/tokenizers/llama2-spm"}
PATHO, IMU, OURS = "qllava/assets/demo/pathology", "qllava/assets/demo/imu", "tests/parity/records.json"
# template -> records files it runs on
RECORDS = {"plain": [f"{PATHO}/pretrain.json", f"{IMU}/pretrain.json", OURS],
           **{t: [f"{PATHO}/finetune.json", f"{IMU}/finetune.json", OURS] for t in CHAT_TEMPLATES}}
IMU_NOTE = ("IMU demo records: '<sensor>' replaced by '<image>' in every turn and the 'sensor' key renamed 'image' "
            "before the original code sees them (the original knows only <image>).")


class StubImageProcessor:
    "What LazySupervisedDataset.__getitem__ reads from a CLIPImageProcessor; pixels are irrelevant to tokenisation."
    image_mean = [0.48145466, 0.4578275, 0.40821073]
    crop_size = {"height": 1, "width": 1}
    def preprocess(self, image, return_tensors="pt"): return {"pixel_values": [torch.zeros(3, 1, 1)]}


def load_records(rel):
    recs = json.loads((ROOT / rel).read_text())
    note = None
    if rel.startswith(IMU):
        note = IMU_NOTE
        out = []
        for r in recs:
            r = copy.deepcopy(r)
            if "sensor" in r: r = {("image" if k == "sensor" else k): v for k, v in r.items()}
            for t in r["conversations"]: t["value"] = t["value"].replace("<sensor>", "<image>")
            out.append(r)
        recs = out
    return recs, note


def plain_applicable(r):
    "preprocess_plain asserts two turns and <image> in the first; only such records of our own set go to `plain`."
    c = r["conversations"]
    return "image" in r and len(c) == 2 and "<image>" in c[0]["value"]


def _tokenizers_015_json(src: pathlib.Path, dst: pathlib.Path) -> list:
    """Rewrite a tokenizer.json saved by tokenizers >= 0.19 into the schema tokenizers 0.15.1 reads, same behaviour:
    Metaspace `split: true` -> dropped (0.15 always splits on the replacement) + `add_prefix_space: true` (0.15 applies
    `prepend_scheme` only when it is set); BPE `ignore_merges: false` -> dropped (0.15 has no such option and behaves as
    False); BPE merges as pairs -> "a b" strings (0.15 reads only strings; no merge part contains a space)."""
    t = json.loads(src.read_text())
    changes = []
    def fix_pre(p):
        if p is None: return
        if p.get("type") == "Sequence":
            for q in p["pretokenizers"]: fix_pre(q)
        elif p.get("type") == "Metaspace" and "split" in p:
            if p.pop("split") is not True: raise SystemExit("Metaspace split=false has no tokenizers-0.15 equivalent")
            p["add_prefix_space"] = p.get("prepend_scheme", "always") != "never"
            changes.append("pre_tokenizer Metaspace: split=true dropped, add_prefix_space=true")
    fix_pre(t.get("pre_tokenizer"))
    m = t["model"]
    if "ignore_merges" in m:
        if m.pop("ignore_merges"): raise SystemExit("BPE ignore_merges=true has no tokenizers-0.15 equivalent")
        changes.append("BPE ignore_merges=false dropped")
    if m.get("merges") and isinstance(m["merges"][0], list):
        assert not any(" " in a or " " in b for a, b in m["merges"])
        m["merges"] = [f"{a} {b}" for a, b in m["merges"]]
        changes.append("BPE merges: [a, b] pairs -> 'a b' strings")
    dst.write_text(json.dumps(t, ensure_ascii=False))
    return changes


def load_tokenizer(name, scratch):
    """The original train()'s tokenizer load. A folder whose tokenizer.json tokenizers 0.15.1 cannot parse is copied to
    `scratch` with that file rewritten by `_tokenizers_015_json` (said in the case's `notes`)."""
    folder = ROOT / TOKENIZERS[name]
    notes = []
    load_from = folder
    if (folder / "tokenizer.json").exists():
        try: tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            load_from = pathlib.Path(tempfile.mkdtemp(dir=scratch, prefix=f"tok-{name}-")) / name
            shutil.copytree(folder, load_from)
            ch = _tokenizers_015_json(folder / "tokenizer.json", load_from / "tokenizer.json")
            notes.append(f"tokenizers {tokenizers.__version__} cannot read this tokenizer.json ({e}); loaded a copy "
                         f"rewritten to its schema with the same behaviour: " + "; ".join(ch))
    slow_files = [f for f in ("tokenizer.model", "spiece.model", "vocab.json") if (folder / f).exists()]
    if not slow_files:
        notes.append("no slow-tokenizer file in the folder: AutoTokenizer(use_fast=False) loads the class its "
                     "tokenizer_config names")
    tok = transformers.AutoTokenizer.from_pretrained(str(load_from), cache_dir=None, model_max_length=2048,
                                                     padding_side="right", use_fast=False)
    tok.pad_token = tok.unk_token
    if tok.is_fast and slow_files: notes.append("loaded fast although use_fast=False")
    return tok, notes


def make_image_folder(records, scratch):
    folder = pathlib.Path(tempfile.mkdtemp(dir=scratch, prefix="images-"))
    for r in records:
        if "image" in r:
            p = folder / r["image"]
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.exists(): Image.new("RGB", (1, 1)).save(p, format="PNG")  # PNG bytes whatever the name (.npy)
    return folder


def run_case(tok_name, tok, tok_notes, template, rel, scratch, legacy_override=None):
    conversation_lib.default_conversation = conversation_lib.conv_templates[template]
    records, rec_note = load_records(rel)
    skipped = []
    if template == "plain" and rel == OURS:
        skipped = [r["id"] for r in records if not plain_applicable(r)]
    data_path = pathlib.Path(tempfile.mkstemp(dir=scratch, suffix=".json")[1])
    data_path.write_text(json.dumps(records, ensure_ascii=False))
    data_args = DataArguments(data_path=str(data_path), lazy_preprocess=True, is_multimodal=True,
                              image_folder=str(make_image_folder(records, scratch)), image_aspect_ratio="pad")
    data_args.image_processor = StubImageProcessor()
    data_args.mm_use_im_start_end = False  # train(): data_args.mm_use_im_start_end = model_args.mm_use_im_start_end
    ds = LazySupervisedDataset(data_path=str(data_path), tokenizer=tok, data_args=data_args)
    out = []
    for i, r in enumerate(records):
        if r["id"] in skipped: continue
        buf = io.StringIO()
        rec = {"id": r["id"], "index": i, "has_image": "image" in r}
        try:
            with contextlib.redirect_stdout(buf):
                d = ds[i]
            rec["input_ids"] = d["input_ids"].tolist()
            rec["labels"] = d["labels"].tolist()
        except Exception as e:
            rec["input_ids"] = rec["labels"] = None
            rec["error"] = f"{type(e).__name__}: {e}"
        printed = buf.getvalue()
        rec["mismatch"] = "tokenization mismatch" in printed
        if printed.strip(): rec["stdout"] = printed.strip()
        out.append(rec)
    legacy = getattr(tok, "legacy", None)
    case = {"tokenizer": tok_name, "tokenizer_folder": TOKENIZERS[tok_name], "tokenizer_class": type(tok).__name__,
            "is_fast": tok.is_fast, "legacy": legacy, "legacy_overridden": legacy_override is not None,
            "template": template, "records_file": rel,
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "n_records": len(out), "n_mismatch": sum(r["mismatch"] for r in out),
            "n_error": sum("error" in r for r in out), "notes": list(tok_notes)}
    if legacy_override is not None:
        case["notes"].append(f"tokenizer.legacy set to {legacy_override} by the fixture, NOT by the original: "
                             f"{type(tok).__name__} has no `legacy` attribute, so the original preprocess_v1 raises "
                             "AttributeError on every record with 2+ rounds (the case with legacy_overridden=false). "
                             "With False, preprocess_v1 takes 1 off each later round's length (the non-legacy "
                             "correction); with True it does not")
    if rec_note: case["notes"].append(rec_note)
    if skipped: case["skipped_not_caption_pairs"] = skipped
    if template == "plain":
        case["notes"].append("plain: preprocess_plain replaces the first turn by '<image>' alone and appends '\\n'")
    case["records"] = out
    return case


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS), choices=list(TOKENIZERS))
    ap.add_argument("--templates", nargs="+", default=["plain"] + CHAT_TEMPLATES)
    ap.add_argument("--out", default=str(ROOT / "tests/parity/llava_fixture.json.gz"))
    ap.add_argument("--command", default=" ".join(sys.argv), help="recorded in meta")
    a = ap.parse_args()
    cases = []
    with tempfile.TemporaryDirectory(prefix="llava-fixture-") as scratch:
        for name in a.tokenizers:
            for template in a.templates:
                for rel in RECORDS[template]:
                    n0 = len(cases)
                    tok, notes = load_tokenizer(name, scratch)  # fresh per case: nothing carries over
                    cases.append(run_case(name, tok, notes, template, rel, scratch))
                    if template.startswith("v1") and not hasattr(tok, "legacy"):
                        for value in (False, True):  # the original would raise; what each value would give
                            tok, notes = load_tokenizer(name, scratch)
                            tok.legacy = value
                            cases.append(run_case(name, tok, notes, template, rel, scratch, legacy_override=value))
                    for c in cases[n0:]:
                        print(f"{name:11s} {template:17s} {rel:42s} legacy={c['legacy']!s:5s} "
                              f"records={c['n_records']:4d} mismatch={c['n_mismatch']:4d} error={c['n_error']:4d}",
                              file=sys.stderr)
    meta = {"versions": {p: metadata.version(p) for p in ("torch", "transformers", "tokenizers", "sentencepiece",
                                                          "protobuf", "llava-torch", "pillow")},
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": a.command,
            "original": "haotian-liu/LLaVA as PyPI llava-torch==1.2.2.post1; its llava/train/train.py, conversation.py, "
                        "mm_utils.py and constants.py are byte-identical to the GitHub repository at commit "
                        "c121f0432da27facab705978f83c4ada465e46fd",
            "path": "llava.train.train.LazySupervisedDataset.__getitem__ -> preprocess_multimodal -> preprocess",
            "image_token_index": IMAGE_TOKEN_INDEX, "ignore_index": IGNORE_INDEX,
            "model_max_length": 2048, "mm_use_im_start_end": False}
    out = pathlib.Path(a.out)
    with gzip.open(out, "wt", encoding="utf-8", compresslevel=9) as f:
        json.dump({"meta": meta, "cases": cases}, f, ensure_ascii=False, separators=(",", ":"))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {len(cases)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
