"""Data pipeline throughput, side by side with the plain alternatives.

1. Records indexed per second: `qllava.data.dataset.load_records` (byte-offset index, nothing parsed) on a 100k-record
   JSON list and JSONL file, against reading the same file whole with `json.load` / `json.loads` per line (what
   LLaVA does). Also: random access and a full pass over the lazy records, and the memory each approach holds.
2. Length estimates for the sampler: `MultimodalDataset.lengths` on the 100k file (no media decoded, no record
   fully tokenised) against tokenising every conversation's text with the tokenizer in one batch.
3. Tokenised samples per second: `MultimodalDataset[i]` with the shipped `llama-demo` tokenizer (text only, and with
   the demo pathology tiles decoded by the tiny-clip image processor), and the batched
   `qllava.data.tokenize.tokenize_conversations` for comparison; one torch thread, as in a DataLoader worker.
4. The sampler: planning one epoch of 100k samples on 8 ranks.

The 100k records are the shipped demo conversations (pathology + IMU) repeated with fresh ids, so the text and
its tokenisation are realistic for the demo tokenizer. Writes bench/results/data.json and data.md.

    python bench/bench_data.py [--n 100000]
"""
import argparse, gc, json, os, platform, random, sys, tempfile, time, tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from qllava.data.dataset import load_records, MultimodalDataset, ModalityLengthGroupedSampler  # noqa: E402


def timed(fn, repeat=1):
    "(best seconds over `repeat` runs, result of the last run)."
    best, out = float("inf"), None
    for _ in range(repeat):
        gc.collect(); t = time.perf_counter(); out = fn(); best = min(best, time.perf_counter() - t)
    return best, out


def held_bytes(fn):
    "Bytes still allocated by Python after `fn()` returns what it built (tracemalloc, result kept alive)."
    gc.collect(); tracemalloc.start()
    try:
        out = fn(); cur, _ = tracemalloc.get_traced_memory()
    finally: tracemalloc.stop()
    del out
    return cur


def make_files(folder: Path, n: int):
    "A 100k-record JSON list and JSONL file made of the demo conversations with fresh ids."
    from qllava.data.presets import demo_paths
    base = []
    for m in ("pathology", "imu"):
        p = demo_paths(m)
        for split in ("pretrain", "finetune"):
            if p[split].exists(): base += json.loads(p[split].read_text())
    source = "shipped demo records (pathology + IMU) repeated"
    if not base:
        source = "synthetic records (demo data not built)"
        base = [{"image": "x.png", "conversations": [{"from": "human", "value": "<image>\nWhat stain dominates this tile?"},
                                                     {"from": "gpt", "value": "Brown DAB staining covers most of the tile."}]},
                {"conversations": [{"from": "human", "value": "What is hematoxylin?"}, {"from": "gpt", "value": "A nuclear stain."}]}]
    strip = lambda v: v.replace("<image>\n", "").replace("<image>", "").replace("<sensor>\n", "").replace("<sensor>", "").strip()
    text_only = [{"id": "", "conversations": [{**t, "value": strip(t["value"])} for t in r["conversations"]]}
                 for r in base if "image" in r][:50]                                            # text-only variants
    base = base + text_only
    recs = [{**base[i % len(base)], "id": f"r{i:06d}"} for i in range(n)]
    (folder / "big.json").write_text(json.dumps(recs, indent=1))
    with open(folder / "big.jsonl", "w") as f:
        for r in recs: f.write(json.dumps(r) + "\n")
    return recs, source


def bench_index(folder: Path, n: int):
    rows = []
    for name, kind in (("big.jsonl", "JSONL"), ("big.json", "JSON list")):
        path = folder / name
        mb = path.stat().st_size / 1e6
        t_lazy, recs = timed(lambda: load_records(path), repeat=2)
        assert len(recs) == n and recs._items is None
        if kind == "JSONL": full = lambda: [json.loads(line) for line in open(path, "rb") if line.strip()]
        else: full = lambda: json.load(open(path, "rb"))
        t_full, data = timed(full)
        assert len(data) == n
        idx = random.Random(0).sample(range(n), min(n, 10_000))
        t_rand, _ = timed(lambda: [recs[i] for i in idx])
        t_iter, _ = timed(lambda: sum(1 for _ in recs))
        mem_lazy = held_bytes(lambda: load_records(path))
        mem_full = held_bytes(full) if kind == "JSONL" else rows[0]["full_parse_held_MB"] * 1e6   # the same dicts either way
        rows.append({"file": kind, "records": n, "MB": round(mb, 1),
                     "lazy_index_s": round(t_lazy, 3), "lazy_records_indexed_per_s": round(n / t_lazy),
                     "full_parse_s": round(t_full, 3), "full_parse_records_per_s": round(n / t_full),
                     "speedup": round(t_full / t_lazy, 1),
                     "random_access_records_per_s": round(len(idx) / t_rand),
                     "full_pass_records_per_s": round(n / t_iter),
                     "lazy_held_MB": round(mem_lazy / 1e6, 2), "full_parse_held_MB": round(mem_full / 1e6, 1)})
        del data, recs
    return rows


def bench_lengths(folder: Path, n: int, tok):
    from qllava.data.media import ImageProcessor, SensorProcessor
    ds = MultimodalDataset(folder / "big.jsonl", tok, "vicuna_v1", folder, {"image": ImageProcessor(64), "sensor": SensorProcessor(100, 6)},
                           {"image": 16, "sensor": 100}, max_length=2048)
    t_est, lengths = timed(lambda: ds.lengths)
    recs = load_records(folder / "big.jsonl")
    k = min(n, 5_000)
    texts = ["\n".join(t["value"] for t in recs[i]["conversations"]) for i in range(k)]
    t_tok, _ = timed(lambda: tok(texts, add_special_tokens=False)["input_ids"])
    # accuracy of the estimate against the real token count (media placeholders expanded) of 500 random samples
    from qllava.data.tokenize import tokenize_conversation
    idx = random.Random(1).sample(range(n), 500)
    real = [len(tokenize_conversation(recs[i]["conversations"], tok, "vicuna_v1", ds.n_media_tokens, 2048).input_ids) for i in idx]
    est = [lengths[i] for i in idx]
    import numpy as np
    rel = np.abs(np.array(est) - np.array(real)) / np.array(real)
    return {"records": n, "estimate_s": round(t_est, 3), "estimate_records_per_s": round(n / t_est),
            "tokenize_text_records_per_s": round(k / t_tok), "estimate_vs_tokenize_speedup": round((n / t_est) / (k / t_tok), 1),
            "estimate_mean_rel_error": round(float(rel.mean()), 3), "estimate_max_rel_error": round(float(rel.max()), 3),
            "estimate_checked_samples": len(real)}


def bench_tokenise(folder: Path, tok):
    from qllava.data.media import ImageProcessor
    from qllava.data.presets import demo_paths, get_preset
    from qllava.data.tokenize import tokenize_conversations
    rows = []
    recs = load_records(folder / "big.jsonl")
    text_idx = [i for i in range(5000) if "image" not in recs[i] and "sensor" not in recs[i]][:1000]
    ds = MultimodalDataset(folder / "big.jsonl", tok, "vicuna_v1", folder, {}, {"image": 16, "sensor": 100}, max_length=2048)
    ds[text_idx[0]]
    t, _ = timed(lambda: [ds[i] for i in text_idx], repeat=3)
    rows.append({"what": "MultimodalDataset[i], text-only records (tokenise on access)", "samples": len(text_idx), "samples_per_s": round(len(text_idx) / t)})
    convs = [recs[i]["conversations"] for i in text_idx]
    t, _ = timed(lambda: tokenize_conversations(convs, tok, "vicuna_v1", {"image": 16, "sensor": 100}, 2048), repeat=3)
    rows.append({"what": "tokenize_conversations, same records in one batch", "samples": len(convs), "samples_per_s": round(len(convs) / t)})
    p = demo_paths("pathology")
    if p["finetune"].exists():
        pre = get_preset("tiny-clip")
        c = pre["preprocessing"]
        n_tok = (pre["config"]["image_size"] // pre["config"]["patch_size"]) ** 2
        dsi = MultimodalDataset(p["finetune"], tok, "vicuna_v1", p["media_folder"],
                                {"image": ImageProcessor(c["image_size"], tuple(c["mean"]), tuple(c["std"]))}, {"image": n_tok}, max_length=2048)
        dsi[0]
        t, _ = timed(lambda: [dsi[i] for i in range(len(dsi))], repeat=3)
        rows.append({"what": f"MultimodalDataset[i], demo pathology finetune (tokenise + decode {c['image_size']}px tile)",
                     "samples": len(dsi), "samples_per_s": round(len(dsi) / t)})
        dsi224 = MultimodalDataset(p["finetune"], tok, "vicuna_v1", p["media_folder"], {"image": ImageProcessor(224)}, {"image": 49}, max_length=2048)
        dsi224[0]
        t, _ = timed(lambda: [dsi224[i] for i in range(len(dsi224))], repeat=3)
        rows.append({"what": "MultimodalDataset[i], demo pathology finetune, tiles padded and resized to 224 px",
                     "samples": len(dsi224), "samples_per_s": round(len(dsi224) / t)})
    return rows


def bench_sampler(n: int):
    import numpy as np
    rng = np.random.default_rng(0)
    lens = rng.integers(20, 2000, n) * np.where(rng.random(n) < 0.7, 1, -1)
    s = ModalityLengthGroupedSampler(lens, 16, num_replicas=8, rank=3, seed=0)
    t_init, _ = timed(lambda: ModalityLengthGroupedSampler(lens, 16, num_replicas=8, rank=3, seed=0))
    t, batches = timed(lambda: list(s), repeat=2)
    return {"samples": n, "num_replicas": 8, "batch_size": 16, "batches_per_rank": len(batches),
            "init_s": round(t_init, 4), "epoch_plan_s": round(t, 3)}


def to_markdown(res: dict) -> str:
    L = [f"# Data pipeline benchmark", "", f"{res['machine']}; {res['date']}. Records: {res['records_source']}.", "",
         "## Records indexed per second (100k records)", "",
         "| file | MB | qllava lazy index (records/s) | full parse, json (records/s) | speedup | random access (records/s) | full pass over lazy records (records/s) | memory held: lazy / full parse (MB) |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["index"]:
        L.append(f"| {r['file']} | {r['MB']} | {r['lazy_records_indexed_per_s']:,} ({r['lazy_index_s']} s) | {r['full_parse_records_per_s']:,} ({r['full_parse_s']} s) "
                 f"| {r['speedup']}x | {r['random_access_records_per_s']:,} | {r['full_pass_records_per_s']:,} | {r['lazy_held_MB']} / {r['full_parse_held_MB']} |")
    e = res["lengths"]
    L += ["", "## Length estimates for the grouped sampler", "",
          "| method | records/s |", "|---|---:|",
          f"| `MultimodalDataset.lengths` (estimate, {e['records']:,} records in {e['estimate_s']} s) | {e['estimate_records_per_s']:,} |",
          f"| tokenising every conversation's text in one batch (llama-demo) | {e['tokenize_text_records_per_s']:,} |",
          "", f"Estimate vs real token count on {e['estimate_checked_samples']} random samples (vicuna_v1, media tokens included): mean relative error "
          f"{e['estimate_mean_rel_error']:.1%}, max {e['estimate_max_rel_error']:.1%}.",
          "", "## Tokenised samples per second (llama-demo tokenizer, vicuna_v1)", "", "| what | samples | samples/s |", "|---|---:|---:|"]
    for r in res["tokenise"]: L.append(f"| {r['what']} | {r['samples']} | {r['samples_per_s']:,} |")
    s = res["sampler"]
    L += ["", "## Sampler", "", f"Planning one epoch of {s['samples']:,} samples for rank 3 of {s['num_replicas']} "
          f"(batch {s['batch_size']}, {s['batches_per_rank']} batches): {s['epoch_plan_s']} s (construction {s['init_s']} s).", ""]
    return "\n".join(L)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="records in the generated files")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for data.json and data.md")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    from qllava.data.presets import load_tokenizer
    from qllava.data.tokenize import prepare_tokenizer
    import torch, transformers
    torch.set_num_threads(1)   # as in a DataLoader worker (PyTorch gives each worker one thread)
    tok = prepare_tokenizer(load_tokenizer("llama-demo"))
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        _, source = make_files(folder, a.n)
        res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at start), Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
               "records_source": source}
        res["index"] = bench_index(folder, a.n); print(json.dumps(res["index"], indent=1))
        res["lengths"] = bench_lengths(folder, a.n, tok); print(json.dumps(res["lengths"], indent=1))
        res["tokenise"] = bench_tokenise(folder, tok); print(json.dumps(res["tokenise"], indent=1))
        res["sampler"] = bench_sampler(a.n); print(json.dumps(res["sampler"], indent=1))
    res["total_s"] = round(time.perf_counter() - t0, 1)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "data.md").write_text(to_markdown(res) + f"\nTotal run time {res['total_s']} s.\n")
    print(to_markdown(res)); print(f"wrote {out/'data.json'} and {out/'data.md'} in {res['total_s']} s")


if __name__ == "__main__":
    main()
