"""Scoring a benchmark with its intervals: `benchmarks.score_benchmark` on 1,000 questions (Quilt-VQA's mix: about 73 %
open, 27 % closed), every metric with a 95 % percentile bootstrap interval from 1,000 (and 10,000) resamples, overall
and per category; beside it the same intervals computed one resample at a time in Python (what a hand loop costs), and
the paired comparison of two runs (McNemar + paired bootstrap). Goal: 1,000 questions scored with intervals in under
10 s. Writes bench/results/stats.json and stats.md.

    python bench/bench_stats.py [--n 1000] [--repeats 3]
"""

import argparse, json, os, platform, random, sys, time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
from qllava.evaluation.benchmarks import score_benchmark  # noqa: E402
from qllava.workflows.bench import compare_benchmark  # noqa: E402

WORDS = "gland mucin nuclei stroma fibrosis necrosis mitosis lymphocyte carcinoma adenoma epithelium vessel".split()


def synthetic(n: int, seed: int):
    "Ground truth and two runs' answers in Quilt-VQA's formats: short open answers, closed 'Yes, ...' / 'No, ...'."
    rng = random.Random(seed)
    gt, a, b = [], [], []
    for i in range(n):
        if rng.random() < 0.27:
            yes = rng.random() < 0.5
            gt.append(
                {
                    "id": i,
                    "answer": ("Yes, " if yes else "No, ") + " ".join(rng.sample(WORDS, 3)),
                    "answer_type": "CLOSED",
                    "yes_no_answer": "yes" if yes else "no",
                    "category": "closed",
                }
            )
            for run, p in ((a, 0.7), (b, 0.75)):
                right = rng.random() < p
                run.append(
                    {"question_id": i, "text": ("yes" if yes == right else "no, it is not") + " " + rng.choice(WORDS)}
                )
        else:
            truth = rng.sample(WORDS, rng.randint(1, 4))
            gt.append({"id": i, "answer": " ".join(truth), "answer_type": "OPEN", "category": "open"})
            for run in (a, b):
                run.append(
                    {"question_id": i, "text": " ".join(rng.sample(truth, 1) + rng.sample(WORDS, rng.randint(1, 8)))}
                )
    return gt, a, b


def loop_intervals(rows, n_resamples: int, seed: int) -> dict:
    "The same percentile intervals, one resample at a time in Python (the baseline a hand-written loop gives)."
    rng = random.Random(seed)
    out = {}
    for k in ("recall", "f1", "yes_no_accuracy"):
        xs = [r[k] for r in rows if k in r]
        means = sorted(sum(xs[rng.randrange(len(xs))] for _ in xs) / len(xs) for _ in range(n_resamples))
        out[k] = (means[int(0.025 * n_resamples)], means[int(0.975 * n_resamples) - 1])
    return out


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="questions")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (the best is reported)")
    a = ap.parse_args(argv)
    gt, run_a, run_b = synthetic(a.n, 0)
    res, rows = score_benchmark("quilt_vqa", gt, run_a)
    rows_b = score_benchmark("quilt_vqa", gt, run_b)[1]
    ids = lambda rs: {r["id"]: r for r in rs}
    cases = {
        "score_benchmark, 1,000 resamples (metrics + intervals overall and per category)": lambda: score_benchmark(
            "quilt_vqa", gt, run_a, n_resamples=1000
        ),
        "score_benchmark, 10,000 resamples": lambda: score_benchmark("quilt_vqa", gt, run_a, n_resamples=10000),
        "paired comparison of two runs (McNemar + paired bootstrap, every metric), 1,000 resamples": lambda: (
            compare_benchmark(ids(rows), ids(rows_b), 1000)
        ),
        "baseline: 3 metrics' intervals, one resample at a time in Python, 1,000 resamples": lambda: loop_intervals(
            rows, 1000, 0
        ),
    }
    figures = {name: round(best(fn, a.repeats), 3) for name, fn in cases.items()}
    info = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "numpy": np.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = {
        "n_questions": a.n,
        "n_open": res["metrics"]["recall"]["n"],
        "n_closed": res["metrics"]["yes_no_accuracy"]["n"],
        "seconds": figures,
        "goal_seconds": 10,
        "machine": info,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "stats.json").write_text(json.dumps(out, indent=1))
    lines = [
        f"# Scoring {a.n} questions with 95 % bootstrap intervals ({out['n_open']} open, {out['n_closed']} closed)",
        "",
        f"Best of {a.repeats}, {info['when']}, {info['cpus']} CPUs, load average {info['load_average'][0]:.2f}; "
        "goal: under 10 s.",
        "",
        "| what | seconds |",
        "|---|---:|",
    ] + [f"| {k} | {v:.3f} |" for k, v in figures.items()]
    (HERE / "results" / "stats.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if figures[next(iter(figures))] < 10 else 1


if __name__ == "__main__":
    sys.exit(main())
