"""Serving throughput: `qllava serve` with dynamic batching (up to 16 requests per generate call) beside the same server
answering one request at a time (`--max-batch 1`), on the same checkpoint (bench preset: a ~60M LLaMA + ViT-B/32 tower,
random weights), driven by N concurrent `openai` clients over HTTP on 127.0.0.1 (1, 4, 16). Every request is an image +
question, greedy, 16 new tokens. Reports requests/s and p50 / p95 latency; every answer is checked equal between the two
servers. Target: >= 4x requests/s at 16 clients. Writes bench/results/serve.json and serve.md.

    python bench/bench_serve.py [--requests 32] [--max-tokens 16] [--llm preset:bench-llama]
                                [--encoder preset:bench-vit-b32]
"""

import argparse, asyncio, base64, json, os, platform, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
from qllava.serving.serve import free_port, wait_until_up  # noqa: E402


def build(folder: Path, llm: str, encoder: str) -> Path:
    from qllava.modeling.model import build_model
    from qllava.modeling.checkpoint import save_checkpoint

    model, tok = build_model(llm, {"image": encoder}, seed=0)
    save_checkpoint(model, folder / "ckpt", tokenizer=tok)
    return folder / "ckpt"


def start(ckpt: Path, max_batch: int):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qllava.cli",
            "serve",
            "--model-path",
            str(ckpt),
            "--port",
            str(port),
            "--max-batch",
            str(max_batch),
            "--batch-wait-ms",
            "20",
            "--model-name",
            "bench",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url + "/health", proc, timeout=300)
    except Exception:
        proc.kill()
        raise
    return proc, url


def requests(n: int, seed: int = 0) -> list:
    from PIL import Image
    import io

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        out.append(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": f"Describe tile {i}."},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ]
        )
    return out


async def drive(url: str, msgs: list, clients: int, max_tokens: int) -> dict:
    "Send every request, `clients` at a time; latency per request, overall requests/s, and the answers."
    import openai

    sem, lat, answers = asyncio.Semaphore(clients), [], {}
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600) as c:

        async def one(i, m):
            async with sem:
                t0 = time.perf_counter()
                r = await c.chat.completions.create(model="bench", messages=m, max_tokens=max_tokens, temperature=0)
                lat.append(time.perf_counter() - t0)
                answers[i] = r.choices[0].message.content

        t0 = time.perf_counter()
        await asyncio.gather(*[one(i, m) for i, m in enumerate(msgs)])
        wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=20)
    return {
        "requests_per_s": len(msgs) / wall,
        "p50_s": statistics.median(lat),
        "p95_s": q[18],
        "wall_s": wall,
        "answers": answers,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32, help="requests per measurement")
    ap.add_argument("--max-tokens", type=int, default=16, help="new tokens per answer")
    ap.add_argument("--llm", default="preset:bench-llama")
    ap.add_argument("--encoder", default="preset:bench-vit-b32")
    ap.add_argument("--clients", default="1,4,16", help="concurrency levels")
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.clients.split(",")]
    msgs = requests(a.requests)
    rows, same = [], True
    with tempfile.TemporaryDirectory() as d:
        ckpt = build(Path(d), a.llm, a.encoder)
        for label, max_batch in (("batched (max 16)", 16), ("one at a time", 1)):
            proc, url = start(ckpt, max_batch)
            try:
                asyncio.run(drive(url, msgs[:2], 1, a.max_tokens))  # warm-up
                for n in levels:
                    r = asyncio.run(drive(url, msgs, n, a.max_tokens))
                    rows.append(
                        {
                            "server": label,
                            "clients": n,
                            **{k: round(v, 3) for k, v in r.items() if k != "answers"},
                            "answers": r["answers"],
                        }
                    )
            finally:
                proc.terminate()
                proc.wait(30)
    ref = rows[len(levels)]["answers"]  # one at a time, first level
    same = all(r["answers"] == ref for r in rows)
    for r in rows:
        r.pop("answers")
    speed = {
        n: next(r["requests_per_s"] for r in rows if r["server"].startswith("batched") and r["clients"] == n)
        / next(r["requests_per_s"] for r in rows if r["server"] == "one at a time" and r["clients"] == n)
        for n in levels
    }
    info = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "llm": a.llm,
        "encoder": a.encoder,
    }
    out = {
        "rows": rows,
        "speedup": {str(k): round(v, 2) for k, v in speed.items()},
        "answers_equal": same,
        "target_at_16": 4.0,
        "requests": a.requests,
        "max_tokens": a.max_tokens,
        "machine": info,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "serve.json").write_text(json.dumps(out, indent=1))
    lines = [
        f"# qllava serve: batched vs one at a time ({a.requests} image requests, {a.max_tokens} new tokens, "
        f"{a.llm} + {a.encoder})",
        "",
        f"{info['when']}, {info['cpus']} CPUs, load average {info['load_average'][0]:.2f}; "
        f"answers equal between servers: {same}.",
        "",
        "| server | clients | requests/s | p50 s | p95 s |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['server']} | {r['clients']} | {r['requests_per_s']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} |"
        for r in rows
    ]
    lines += ["", "| clients | batched / one at a time (requests/s) |", "|---:|---:|"] + [
        f"| {k} | {v:.2f}x |" for k, v in speed.items()
    ]
    (HERE / "results" / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
