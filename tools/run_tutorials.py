"""Execute the tutorials as `nbdev_test` does and keep what they showed: `python tools/run_tutorials.py [--out DIR]`.

Each notebook under nbs/tutorials runs in its own folder with nbdev's rules (cells marked `#| eval: false` are
skipped, `IN_TEST` is set) and is written with its outputs to DIR (default `_proc/executed/tutorials`), where
`make docs` finds the outputs and plots to show; the sources in nbs/ stay without outputs. Written by hand because
`nbdev_test` runs a notebook and drops what it printed. Exit 1 when any tutorial fails, with its traceback.
"""
import argparse, os, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _skip(cell):
    "nbdev_test's rule: only code cells run, never one marked `#| eval: false` or one that calls nbdev_export"
    if cell.cell_type != 'code' or 'nbdev_export' + '(' in cell.source: return True
    return (getattr(cell, 'directives_', {}) or {}).get('eval:', [''])[0].lower() == 'false'


def run_one(src:Path, out:Path) -> str|None:
    "Execute `src` in its folder and write it with outputs to `out`; the traceback text when it fails."
    from execnb.nbio import write_nb
    from execnb.shell import CaptureShell
    from nbdev.process import NBProcessor
    os.environ['IN_TEST'] = '1'
    nb = NBProcessor(src, process=True).nb
    k = CaptureShell(src)
    cwd = os.getcwd()
    try:
        os.chdir(src.parent)
        k.run_all(nb, exc_stop=True, preproc=_skip)
    except Exception: return k.prettytb(fname=src)
    finally: os.chdir(cwd)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, out)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=str(ROOT / '_proc' / 'executed' / 'tutorials'))
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--one', help=argparse.SUPPRESS)  # run this notebook here (each runs in a process of its own)
    a = ap.parse_args(argv)
    if a.one:
        err = run_one(Path(a.one), Path(a.out) / Path(a.one).name)
        if err: print(err, file=sys.stderr)
        return 1 if err else 0
    srcs = sorted((ROOT / 'nbs' / 'tutorials').glob('*.ipynb'))
    def one(src):
        return subprocess.run([sys.executable, __file__, '--one', str(src), '--out', a.out], capture_output=True, text=True)
    with ThreadPoolExecutor(a.workers) as ex: done = dict(zip(srcs, ex.map(one, srcs)))
    for s, r in done.items():
        print(f'{"FAILED" if r.returncode else "Completed"} {s.relative_to(ROOT)}', flush=True)
        if r.returncode: print(r.stdout[-3000:] + r.stderr[-6000:], file=sys.stderr)
    return 1 if any(r.returncode for r in done.values()) else 0


if __name__ == '__main__': sys.exit(main())
