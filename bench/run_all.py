"""Run every benchmark in this folder, one after another (they must not share the 2 cores), and list the tables.

Each benchmark writes bench/results/<name>.json and <name>.md; this script only runs them and prints the tables.
"""
import subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_data.py", "bench_model.py", "bench_train.py", "bench_packing.py", "bench_review.py", "bench_memory.py", "bench_stats.py", "bench_serve.py"]

def main(names=None) -> int:
    failed = []
    for name in names or SCRIPTS:
        t0 = time.time()
        print(f"== {name}", flush=True)
        r = subprocess.run([sys.executable, str(HERE / name)], cwd=HERE.parent)
        print(f"== {name}: exit {r.returncode} after {time.time() - t0:.0f} s", flush=True)
        if r.returncode: failed.append(name)
    for md in sorted((HERE / "results").glob("*.md")):
        print(f"\n### {md.stem}\n{md.read_text()}")
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or None))
