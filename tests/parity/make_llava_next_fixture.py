#!/usr/bin/env python
"""Run the ORIGINAL LLaVA-NeXT data path (LLaVA-VL/LLaVA-NeXT, `llava/train/train.py`: preprocess_llama3 and
preprocess_qwen) on records and write what it yields: `input_ids` (IMAGE_TOKEN_INDEX -200 where it puts the image) and
`labels` (-100 masked), per case (tokenizer x chat template x conversation template).

Runs in the scratch venv made by `make_llava_next_fixture.sh`, with the files of one LLaVA-NeXT commit (`llava/`,
`trl/`, exported by `git archive`, unmodified) on PYTHONPATH; imports nothing from qllava (it only reads files of the
repo and the tokenizer folders it is given).

Per record, what `llava.train.train.LazySupervisedDataset._get_item` does (the body of `__getitem__`, called directly
so that a failing record is recorded as an error instead of `__getitem__`'s retry-then-next-sample fallback):
`preprocess_multimodal(copy.deepcopy(...), data_args)` when the record has an "image" key, then
`preprocess(sources, tokenizer, has_image=...)`, which dispatches on `conversation_lib.default_conversation.version`
to `preprocess_llama3` ("llama_v3", template `llava_llama_3`) or `preprocess_qwen` ("qwen", template `qwen_2`).
Stubbed: only the image processor (a zero tensor) and the pictures (1x1 PNG placeholders), which tokenisation never
reads. `data_args`: the original `DataArguments` with is_multimodal=True, mm_use_im_start_end=False,
image_aspect_ratio="pad" (pixels only; the anyres settings of real runs change nothing in input_ids / labels).

Tokenizer set-up is train()'s: a folder path containing "qwen" gets
    AutoTokenizer.from_pretrained(path, cache_dir=None, model_max_length=M, padding_side="right")
and one containing "llama" gets the same plus use_fast=False (these folders have no slow tokenizer, so the fast class
the config names loads either way); then `if tokenizer.unk_token is not None: tokenizer.pad_token = tokenizer.unk_token`
(neither has an unk token: pad stays as loaded) and `default_conversation = conv_templates[version]`.

`--check-texts TEXTS` (run with the project's .venv python, transformers 5) is the sanity check: it re-encodes every
text the original encoded and reports any id difference; it imports neither llava nor qllava.
"""
import argparse, contextlib, copy, datetime, gzip, hashlib, io, json, os, pathlib, platform, shutil, sys, tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_LLAMA3 = "/tmp/hubtok/meta-llama--Llama-3.1-8B-Instruct"
DEFAULT_QWEN2 = "/tmp/hubtok/Qwen--Qwen2.5-7B-Instruct"
MODEL_MAX_LENGTH = 32768  # scripts/train/finetune_onevision.sh passes --model_max_length 32768; nothing truncates here
PATHO, IMU, OURS = "qllava/assets/demo/pathology", "qllava/assets/demo/imu", "tests/parity/records.json"
RECORD_FILES = [f"{PATHO}/finetune.json", f"{IMU}/finetune.json", OURS]
IMU_NOTE = ("IMU demo records: '<sensor>' replaced by '<image>' in every turn and the 'sensor' key renamed 'image' "
            "before the original code sees them (the original knows only <image>).")
# Meta-Llama-3-8B-Instruct's chat template (Llama 3.0): no system block of its own
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Qwen2-7B-Instruct's tokenizer_config.json (the LLM of llava-onevision-qwen2-*) names exactly these two
QWEN2_ADDITIONAL_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]


# ----------------------------------------------------------------------------------------------- fixture (old venv)
class StubImageProcessor:
    "What LazySupervisedDataset reads from an image processor; pixels are irrelevant to tokenisation."
    image_mean = [0.48145466, 0.4578275, 0.40821073]
    crop_size = {"height": 1, "width": 1}
    def preprocess(self, image, return_tensors="pt"):
        import torch
        return {"pixel_values": [torch.zeros(3, 1, 1)]}


def load_records(rel):
    recs = json.loads((ROOT / rel).read_text())
    if not rel.startswith(IMU): return recs, None
    out = []
    for r in recs:
        r = copy.deepcopy(r)
        if "sensor" in r: r = {("image" if k == "sensor" else k): v for k, v in r.items()}
        for t in r["conversations"]: t["value"] = t["value"].replace("<sensor>", "<image>")
        out.append(r)
    return out, IMU_NOTE


def old_schema_json(src: pathlib.Path, dst: pathlib.Path) -> list:
    """Rewrite a tokenizer.json saved by tokenizers >= 0.20 into the schema tokenizers 0.15 reads: BPE merges as
    [a, b] pairs -> "a b" strings (no byte-level merge part contains a space: same merges); BPE `ignore_merges` dropped
    (0.15 has no such option and behaves as false: for `false` identical; for `true` the --check-texts run shows
    whether any recorded text encodes differently)."""
    t = json.loads(src.read_text())
    m, changes = t["model"], []
    if "ignore_merges" in m:
        changes.append(f"BPE ignore_merges={str(m.pop('ignore_merges')).lower()} dropped")
    if m.get("merges") and isinstance(m["merges"][0], list):
        assert not any(" " in a or " " in b for a, b in m["merges"])
        m["merges"] = [f"{a} {b}" for a, b in m["merges"]]
        changes.append("BPE merges: [a, b] pairs -> 'a b' strings")
    dst.write_text(json.dumps(t, ensure_ascii=False))
    return changes


def load_tokenizer(folder: pathlib.Path, scratch, config_patch=None):
    """train()'s tokenizer load (see the module docstring). If tokenizers cannot parse tokenizer.json, or the case
    patches tokenizer_config.json, a copy of the folder in `scratch` is loaded instead (said in the notes)."""
    import tokenizers, transformers
    notes, load_from = [], folder
    try: tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")); bad = None
    except Exception as e: bad = e
    if bad is not None or config_patch:
        load_from = pathlib.Path(tempfile.mkdtemp(dir=scratch, prefix="tok-")) / folder.name
        shutil.copytree(folder, load_from)
    if bad is not None:
        ch = old_schema_json(folder / "tokenizer.json", load_from / "tokenizer.json")
        notes.append(f"tokenizers {tokenizers.__version__} cannot read this tokenizer.json ({bad}); loaded a copy "
                     "rewritten to its schema: " + "; ".join(ch))
    if config_patch:
        cfg = json.loads((load_from / "tokenizer_config.json").read_text())
        cfg.update(config_patch)
        (load_from / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2))
    kw = dict(cache_dir=None, model_max_length=MODEL_MAX_LENGTH, padding_side="right")
    name = folder.name.lower()
    if "qwen" in name: pass
    elif "llama" in name: kw["use_fast"] = False
    else: raise SystemExit(f"{folder}: train() loads a tokenizer only for qwen/llama/... paths")
    tok = transformers.AutoTokenizer.from_pretrained(str(load_from), **kw)
    if tok.unk_token is not None: tok.pad_token = tok.unk_token
    return tok, notes


TEXTS = {}  # (tokenizer folder, len(tokenizer), add_special_tokens, text) -> ids: every text the original encodes


def record_encodings():
    "Wrap PreTrainedTokenizerFast._encode_plus (reached by tokenizer(...) and apply_chat_template) to log texts."
    from transformers import PreTrainedTokenizerFast
    orig = PreTrainedTokenizerFast._encode_plus
    def _encode_plus(self, text, text_pair=None, add_special_tokens=True, **kw):
        out = orig(self, text, text_pair=text_pair, add_special_tokens=add_special_tokens, **kw)
        if text_pair is None and isinstance(text, str):
            TEXTS[(self.name_or_path, len(self), add_special_tokens, text)] = list(out["input_ids"])
        return out
    PreTrainedTokenizerFast._encode_plus = _encode_plus


def make_image_folder(records, scratch):
    from PIL import Image
    folder = pathlib.Path(tempfile.mkdtemp(dir=scratch, prefix="images-"))
    for r in records:
        if "image" in r:
            p = folder / r["image"]
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.exists(): Image.new("RGB", (1, 1)).save(p, format="PNG")  # PNG bytes whatever the name (.npy)
    return folder


def run_case(spec, scratch, files):
    from llava import conversation as conversation_lib
    from llava.train.train import DataArguments, LazySupervisedDataset
    tok, notes = load_tokenizer(spec["folder"], scratch, spec.get("config_patch"))
    if spec.get("chat_template") is not None: tok.chat_template = spec["chat_template"]
    notes += spec.get("notes", [])
    conversation_lib.default_conversation = conversation_lib.conv_templates[spec["template"]]
    out, skipped = [], []
    for rel in files:
        records, rec_note = load_records(rel)
        if rec_note and rec_note not in notes: notes.append(rec_note)
        data_path = pathlib.Path(tempfile.mkstemp(dir=scratch, suffix=".json")[1])
        data_path.write_text(json.dumps(records, ensure_ascii=False))
        data_args = DataArguments(data_path=str(data_path), lazy_preprocess=True, is_multimodal=True,
                                  image_folder=str(make_image_folder(records, scratch)), image_aspect_ratio="pad")
        data_args.image_processor = StubImageProcessor()
        data_args.mm_use_im_start_end = False  # train(): data_args.mm_use_im_start_end = model_args.mm_use_im_start_end
        with contextlib.redirect_stdout(io.StringIO()):  # rank0_print "Loading ..."
            ds = LazySupervisedDataset(data_path=str(data_path), tokenizer=tok, data_args=data_args)
        for i, r in enumerate(records):
            rec = {"id": r["id"], "file": rel, "index": i, "has_image": "image" in r}
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    d = ds._get_item(i)
                rec["input_ids"], rec["labels"] = d["input_ids"].tolist(), d["labels"].tolist()
            except Exception as e:
                rec["input_ids"] = rec["labels"] = None
                rec["error"] = f"{type(e).__name__}: {e}"
            if buf.getvalue().strip(): rec["stdout"] = buf.getvalue().strip()
            out.append(rec)
    errors = sorted({r["error"] for r in out if "error" in r})
    return {"name": spec["name"], "tokenizer": spec["tokenizer"], "tokenizer_folder": str(spec["folder"]),
            "tokenizer_class": type(tok).__name__, "is_fast": tok.is_fast, "template": spec["template"],
            "version": conversation_lib.default_conversation.version,
            "preprocess": {"llama_v3": "preprocess_llama3", "qwen": "preprocess_qwen"}[
                conversation_lib.default_conversation.version],
            "chat_template": tok.chat_template, "additional_special_tokens": list(tok.additional_special_tokens),
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "len_tokenizer": len(tok), "n_records": len(out), "n_error": sum("error" in r for r in out),
            "errors": errors, "notes": notes, "records": out, "skipped": skipped}


def case_worker(spec, scratch, files):
    TEXTS.clear()
    t0 = datetime.datetime.now()
    c = run_case(spec, scratch, files)
    print(f"{c['name']:18s} records={c['n_records']:4d} error={c['n_error']:4d} "
          f"({(datetime.datetime.now() - t0).total_seconds():.0f} s) {c['errors'][:1]}", file=sys.stderr)
    return c, dict(TEXTS)


def sha256(p): return hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest()


def fixture(a):
    from importlib import metadata
    import llava, llava.train.train as llava_train
    from llava.constants import IMAGE_TOKEN_INDEX, IGNORE_INDEX
    src = pathlib.Path(llava.__file__).resolve().parents[1]
    commit = (src / "COMMIT").read_text().strip() if (src / "COMMIT").exists() else None
    record_encodings()
    llama3, qwen2 = pathlib.Path(a.llama3).resolve(), pathlib.Path(a.qwen2).resolve()
    specs = [
        {"name": "llama3.1-template", "tokenizer": llama3.name, "folder": llama3, "template": "llava_llama_3",
         "notes": ["chat template as shipped (Llama 3.1): every apply_chat_template call emits a system block "
                   "('Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024' - this transformers has no "
                   "strftime_now, so the template's fallback date), also for the single user / assistant message "
                   "that preprocess_llama3 renders per turn"]},
        {"name": "llama3-template", "tokenizer": llama3.name, "folder": llama3, "template": "llava_llama_3",
         "chat_template": LLAMA3_TEMPLATE,
         "notes": ["tokenizer.chat_template replaced (after loading) by Meta-Llama-3-8B-Instruct's (Llama 3.0) "
                   "template, the LLM of llama3-llava-next-8b; the fixture's only change to the tokenizer"]},
        {"name": "qwen2.5-as-given", "tokenizer": qwen2.name, "folder": qwen2, "template": "qwen_2",
         "notes": ["tokenizer folder as given: its config names no additional_special_tokens, so preprocess_qwen's "
                   "`im_start, im_end = tokenizer.additional_special_tokens_ids` raises on every record"]},
        {"name": "qwen2", "tokenizer": qwen2.name, "folder": qwen2, "template": "qwen_2",
         "config_patch": {"additional_special_tokens": QWEN2_ADDITIONAL_SPECIAL_TOKENS},
         "notes": ["tokenizer_config.json of a copy given additional_special_tokens=['<|im_start|>', '<|im_end|>'] "
                   "as Qwen2-7B-Instruct's config has (same BPE vocabulary and ids 151643-151645 as Qwen2.5): "
                   "preprocess_qwen unpacks exactly these two; nothing else changes"]},
    ]
    specs = [s for s in specs if not a.cases or s["name"] in a.cases]
    files = [f for f in RECORD_FILES if (ROOT / f).exists()]
    with tempfile.TemporaryDirectory(prefix="llava-next-fixture-") as scratch:
        jobs = [(s, scratch, files) for s in specs]
        if a.jobs > 1:  # one process per case (each record deep-copies the tokenizer: ~0.5 s a record)
            import multiprocessing
            with multiprocessing.get_context("fork").Pool(min(a.jobs, len(jobs))) as pool:
                results = pool.starmap(case_worker, jobs)
        else:
            results = [case_worker(*j) for j in jobs]
    cases = [c for c, _ in results]
    for _, texts in results: TEXTS.update(texts)
    versions = {}
    for p in ("torch", "transformers", "tokenizers", "deepspeed", "accelerate", "datasets", "tyro", "einops",
              "numpy", "pillow", "jinja2"):
        try: versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError: versions[p] = None
    source = {"repository": "https://github.com/LLaVA-VL/LLaVA-NeXT", "commit": commit,
              "files": {f: sha256(src / f) for f in ("llava/train/train.py", "llava/conversation.py",
                                                     "llava/constants.py", "llava/mm_utils.py")},
              "versions": versions, "python": platform.python_version(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "command": a.command,
              "path": "llava.train.train.LazySupervisedDataset._get_item -> preprocess_multimodal -> preprocess -> "
                      "preprocess_llama3 / preprocess_qwen",
              "image_token_index": IMAGE_TOKEN_INDEX, "ignore_index": IGNORE_INDEX,
              "model_max_length": MODEL_MAX_LENGTH, "mm_use_im_start_end": False, "records_files": files,
              "notes": ["llava/ and trl/ of the commit exported by git archive and imported unmodified (no stubs); "
                        "pyproject pins transformers 4.40.0.dev0 (git 1c39974a) with tokenizers~=0.15.2; PyPI's "
                        "closest release that takes tokenizers 0.15 is transformers 4.39.3",
                        "each record is its own batch of one; the collator's padding / truncation is not applied"]}
    out = pathlib.Path(a.out)
    with gzip.open(out, "wt", encoding="utf-8", compresslevel=9) as f:
        json.dump({"source": source, "cases": cases}, f, ensure_ascii=False, separators=(",", ":"))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {len(cases)} cases)", file=sys.stderr)
    if a.texts_out:
        rows = [{"tokenizer": k[0], "len": k[1], "add_special_tokens": k[2], "text": k[3], "ids": v}
                for k, v in TEXTS.items()]
        pathlib.Path(a.texts_out).write_text(json.dumps(rows, ensure_ascii=False))
        print(f"wrote {a.texts_out} ({len(rows)} encoded texts)", file=sys.stderr)


# ------------------------------------------------------------------------------------------- check (project .venv)
def check_texts(a):
    """Re-encode every text the original encoded with this environment's transformers / tokenizers, loading the
    ORIGINAL tokenizer.json (not the rewritten copy); '<image>' added as a special token where the original had
    added it (len(tokenizer) one more). Writes the result into the fixture's source.text_check."""
    import tokenizers, transformers
    rows = json.loads(pathlib.Path(a.check_texts).read_text())
    folders = {pathlib.Path(f).resolve().name: f for f in (a.llama3, a.qwen2)}  # copies keep the folder's name
    toks, diffs, n = {}, [], 0
    for r in rows:
        base = pathlib.Path(r["tokenizer"]).name
        key = (base, r["len"])
        if key not in toks:
            t = transformers.AutoTokenizer.from_pretrained(folders.get(base, r["tokenizer"]))
            if len(t) + 1 == r["len"]: t.add_tokens(["<image>"], special_tokens=True)
            assert len(t) == r["len"], (base, len(t), r["len"])
            toks[key] = t
        ids = toks[key](r["text"], add_special_tokens=r["add_special_tokens"])["input_ids"]
        n += 1
        if ids != r["ids"]:
            diffs.append({"tokenizer": base, "text": r["text"], "old": r["ids"], "new": ids})
    res = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__, "n_texts": n,
           "n_differ": len(diffs), "differences": diffs[:20]}
    print(json.dumps({k: v for k, v in res.items() if k != "differences"}), file=sys.stderr)
    for d in diffs[:5]: print(json.dumps(d, ensure_ascii=False)[:600], file=sys.stderr)
    if a.out and pathlib.Path(a.out).exists():
        with gzip.open(a.out, "rt", encoding="utf-8") as f: fx = json.load(f)
        fx["source"]["text_check"] = res
        with gzip.open(a.out, "wt", encoding="utf-8", compresslevel=9) as f:
            json.dump(fx, f, ensure_ascii=False, separators=(",", ":"))
        print(f"added source.text_check to {a.out}", file=sys.stderr)
    return 1 if diffs else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama3", default=DEFAULT_LLAMA3, help="hub-shaped Llama-3.1-8B-Instruct tokenizer folder")
    ap.add_argument("--qwen2", default=DEFAULT_QWEN2, help="hub-shaped Qwen2.5-7B-Instruct tokenizer folder")
    ap.add_argument("--cases", nargs="*", help="only these case names")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="cases run in parallel processes")
    ap.add_argument("--out", default=str(ROOT / "tests/parity/llava_next_fixture.json.gz"))
    ap.add_argument("--texts-out", help="write every (tokenizer, text, ids) the original encoded here")
    ap.add_argument("--check-texts", help="TEXTS file from --texts-out: re-encode with this environment")
    ap.add_argument("--command", default=" ".join(sys.argv), help="recorded in source")
    a = ap.parse_args()
    if a.check_texts: sys.exit(check_texts(a))
    fixture(a)


if __name__ == "__main__":
    main()
