"""Reviews per second: `qllava review` with bounded concurrency vs one call at a time, against a local
OpenAI-compatible judge (qllava.evaluation.review.LocalJudge on 127.0.0.1) that answers every call after a fixed latency
(200 ms by default, a stand-in for a hosted judge). The judge runs in its own process, as a real judge would, so
that it does not compete with the client for one interpreter lock. Both runs use the same code path, the real openai
client and real HTTP; only `concurrency` differs. Writes bench/results/review.json and review.md.

    python bench/bench_review.py [--n 96] [--concurrency 32] [--latency 0.2]
"""
import argparse, json, multiprocessing, os, platform, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
from qllava.evaluation.review import JudgeSpec, LocalJudge, ReviewInputs, replay_judge, review  # noqa: E402

SHARED = Path(os.environ.get("QLLAVA_SHARED", REPO.parent / "shared")) / "data" / "quilt_gpt"


def inputs(folder: Path, n: int):
    "The Quilt-LLaVA GPT-eval questions when ../shared is present (replaying published reviews), else synthetic ones."
    if (SHARED / "questions.jsonl").exists():
        files = [SHARED / "questions.jsonl", SHARED / "captions.jsonl", SHARED / "answers-gpt4-reference.jsonl",
                 SHARED / "answers" / "quilt-llava-v1.5-7b-gpteval.jsonl"]
        replay = (files[0], files[3], SHARED / "reviews" / "Qreview-gpt4.jsonl")
        return files, replay, "Quilt-LLaVA GPT-eval questions, published GPT-4 reviews replayed"
    rows = {"q": [{"question_id": i, "text": f"What does slide {i} show?", "category": "conv"} for i in range(n)],
            "c": [{"question_id": i, "text": f"slide {i}: glands, mucin [0.1, 0.1, 0.6, 0.7]", "type": "Gastrointestinal"} for i in range(n)],
            "a1": [{"question_id": i, "text": "Glands with mucin."} for i in range(n)],
            "a2": [{"question_id": i, "text": "Glands.", "answer_id": f"m{i}"} for i in range(n)]}
    for k, v in rows.items(): (folder / f"{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in v))
    return [folder / f"{k}.jsonl" for k in rows], None, "synthetic questions, word-overlap judge"


def _serve(conn, replay, latency):
    "Child process: run the local judge until the parent closes the pipe."
    judge = LocalJudge(reply=replay_judge(*replay) if replay else None, latency=latency).start()
    conn.send(judge.url)
    try: conn.recv()
    except EOFError: pass
    judge.stop()


def timed_run(files, replay, n, concurrency, latency, folder: Path, tag: str) -> dict:
    out = folder / f"reviews-{tag}.jsonl"
    parent, child = multiprocessing.get_context("fork").Pipe()
    server = multiprocessing.get_context("fork").Process(target=_serve, args=(child, replay, latency), daemon=True)
    server.start()
    try:
        url = parent.recv()
        t0 = time.perf_counter()
        counts = review(ReviewInputs(*files), out, JudgeSpec("local-judge", base_url=url, concurrency=concurrency, timeout=30),
                        limit=n)
        dt = time.perf_counter() - t0
    finally:
        parent.send("stop"); server.join(10)
    done = counts["reviewed"] + counts["flagged"]
    assert done == n and counts["failed"] == 0, counts
    return {"concurrency": concurrency, "reviews": done, "seconds": round(dt, 3), "reviews_per_s": round(done / dt, 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=96, help="reviews per run")
    ap.add_argument("--concurrency", type=int, default=32, help="calls in flight in the concurrent run (the speed-up's)")
    ap.add_argument("--also", type=int, nargs="*", default=[8, 16], help="further concurrency levels to report")
    ap.add_argument("--latency", type=float, default=0.2, help="seconds the local judge takes per reply")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    os.environ.pop("OPENAI_API_KEY", None)  # the local judge needs none; never ship one into a benchmark log
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        files, replay, source = inputs(d, args.n)
        load_before = os.getloadavg()[0]
        serial = timed_run(files, replay, args.n, 1, args.latency, d, "serial")
        others = [timed_run(files, replay, args.n, c, args.latency, d, f"c{c}") for c in args.also]
        concurrent = timed_run(files, replay, args.n, args.concurrency, args.latency, d, "concurrent")
    speedup = round(concurrent["reviews_per_s"] / serial["reviews_per_s"], 1)
    result = {"benchmark": "qllava review throughput", "judge": f"LocalJudge on 127.0.0.1, {int(args.latency * 1000)} ms per reply",
              "data": source, "client": "openai.AsyncOpenAI (real HTTP)", "one_at_a_time": serial, "concurrent": concurrent, "other_levels": others,
              "speedup": speedup, "target_speedup": 12, "meets_target": speedup >= 12,
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average_at_start": round(load_before, 2)}}
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    (out / "review.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# qllava review: reviews per second", "",
          f"Judge: {result['judge']} (own process); data: {source}; client: {result['client']}; {args.n} reviews per run; "
          f"{os.cpu_count()} CPUs, load average {round(load_before, 1)} at start.", "",
          "| run | concurrency | reviews | seconds | reviews/s |", "|---|---:|---:|---:|---:|",
          f"| one at a time | 1 | {serial['reviews']} | {serial['seconds']} | {serial['reviews_per_s']} |",
          *[f"| concurrent | {o['concurrency']} | {o['reviews']} | {o['seconds']} | {o['reviews_per_s']} |" for o in others],
          f"| concurrent | {concurrent['concurrency']} | {concurrent['reviews']} | {concurrent['seconds']} | {concurrent['reviews_per_s']} |", "",
          f"Speed-up at concurrency {args.concurrency}: **{speedup}x** (target >= 12x: {'met' if result['meets_target'] else 'NOT met'}).", ""]
    (out / "review.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
