"""`qllava serve` driven by the real `openai` client over HTTP on 127.0.0.1 (issue 21): text and image requests,
streaming, 16 concurrent clients batched together, OpenAI-shaped errors (bad image, unknown model, oversized body,
wrong key, a path outside the media folder) that leave the server up; every answer equals `qllava answer` at batch
size 1. Also `qllava review --base-url` against the server, and `qllava chat` in the terminal (through a pipe)."""

import asyncio, base64, json, os, subprocess, sys
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from qllava.serving.serve import free_port, wait_until_up

pytestmark = pytest.mark.timeout(900)
KEY_ENV, KEY = "QLLAVA_TEST_SERVE_KEY", "test-key-not-secret"
QUESTIONS = [
    "Is the brown DAB staining strong in this tile?",
    "Are nuclei abundant here?",
    "Describe the tissue.",
    "What stain is shown?",
]


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    "A tiny checkpoint, 8 images, 16 questions (12 with an image) and their batch-1 answers from `qllava answer`."
    from qllava.modeling.model import build_model
    from qllava.modeling.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("serve")
    model, tok = build_model(seed=0)
    save_checkpoint(model, d / "ckpt", tokenizer=tok)
    (d / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(d / "img" / f"{i}.png")
    qs = [
        {"question_id": i, "text": QUESTIONS[i % 4], **({"image": f"{i % 8}.png"} if i % 4 != 3 else {})}
        for i in range(16)
    ]
    (d / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", KEY_ENV: KEY}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qllava.cli",
            "answer",
            "--model-path",
            d / "ckpt",
            "--question-file",
            d / "q.jsonl",
            "--image-folder",
            d / "img",
            "--answers-file",
            d / "a.jsonl",
            "--batch-size",
            "1",
            "--max_new_tokens",
            "24",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    ref = {a["question_id"]: a["text"] for a in map(json.loads, (d / "a.jsonl").read_text().splitlines())}
    return d, qs, ref, env


@pytest.fixture(scope="module")
def server(bed):
    d, _, _, env = bed
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qllava.cli",
            "serve",
            "--model-path",
            d / "ckpt",
            "--port",
            str(port),
            "--model-name",
            "tiny",
            "--api-key-env",
            KEY_ENV,
            "--max-body-mb",
            "1",
            "--media-folder",
            d / "img",
            "--batch-wait-ms",
            "50",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url + "/health", proc)
    yield url
    proc.terminate()
    proc.wait(30)


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def messages(q: dict, img: Path) -> list:
    if "image" not in q:
        return [{"role": "user", "content": q["text"]}]
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": q["text"]},
                {"type": "image_url", "image_url": {"url": data_url(img / q["image"])}},
            ],
        }
    ]


def client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_text_and_image_requests_equal_qllava_answer(bed, server):
    d, qs, ref, _ = bed
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    for q in qs[:4]:
        r = c.chat.completions.create(model="tiny", messages=messages(q, d / "img"), max_tokens=24, temperature=0)
        assert r.choices[0].message.content == ref[q["question_id"]], q
        assert r.usage.prompt_tokens > (40 if "image" in q else 0) and r.choices[0].finish_reason in ("stop", "length")


def test_streaming_joins_to_the_same_answer(bed, server):
    d, qs, ref, _ = bed
    chunks = list(
        client(server).chat.completions.create(
            model="tiny", messages=messages(qs[1], d / "img"), max_tokens=24, stream=True
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == ref[qs[1]["question_id"]]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_sixteen_concurrent_clients_are_batched_and_answer_as_batch_one(bed, server):
    d, qs, ref, _ = bed
    before = httpx.get(server + "/health").json()

    async def go():
        c = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)

        async def one(q):
            r = await c.chat.completions.create(model="tiny", messages=messages(q, d / "img"), max_tokens=24)
            return q["question_id"], r.choices[0].message.content

        return dict(await asyncio.gather(*[one(q) for q in qs]))

    got = asyncio.run(go())
    assert got == ref
    after = httpx.get(server + "/health").json()
    assert after["largest_batch"] > 1 and after["batches"] - before["batches"] < 16, (before, after)


@pytest.mark.parametrize(
    "case, status, code",
    [
        ("bad image", 400, "invalid_image"),
        ("unknown model", 404, "model_not_found"),
        ("oversized body", 413, "request_too_large"),
        ("wrong key", 401, "invalid_api_key"),
        ("path outside the folder", 400, None),
        ("max_tokens over the limit", 400, None),
    ],
)
def test_errors_have_openais_shape_and_leave_the_server_up(bed, server, case, status, code):
    d, qs, _, _ = bed
    bad = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    key = KEY
    if case == "bad image":
        body["messages"] = [
            {
                "role": "user",
                "content": [{"type": "text", "text": "?"}, {"type": "image_url", "image_url": {"url": bad}}],
            }
        ]
    if case == "unknown model":
        body["model"] = "gpt-4"
    if case == "oversized body":
        body["messages"][0]["content"] = "x" * (2 * 2**20)
    if case == "wrong key":
        key = "wrong"
    if case == "path outside the folder":
        body["messages"] = [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(d / "q.jsonl")}}]}
        ]
    if case == "max_tokens over the limit":
        body["max_tokens"] = 100000
    with pytest.raises(openai.APIStatusError) as e:
        client(server, key).chat.completions.create(**body)
    assert e.value.status_code == status
    err = e.value.response.json()["error"]
    assert err["message"] and (code is None or err["code"] == code), err
    assert httpx.get(server + "/health").status_code == 200
    r = client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "still there?"}], max_tokens=4
    )
    assert r.choices[0].message.content is not None


def test_local_paths_inside_the_media_folder_are_allowed(bed, server):
    d, qs, ref, _ = bed
    q = qs[0]
    r = client(server).chat.completions.create(
        model="tiny",
        max_tokens=24,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": q["text"]},
                    {"type": "image_url", "image_url": {"url": str(d / "img" / q["image"])}},
                ],
            }
        ],
    )
    assert r.choices[0].message.content == ref[q["question_id"]]


def test_qllava_review_runs_against_the_server(bed, server, tmp_path):
    "Our judge pipeline talks to the server unchanged (a tiny random model judges badly: its replies are flagged)."
    d, qs, ref, env = bed
    q = [{"question_id": i, "text": f"Question {i}?", "category": "conv"} for i in range(3)]
    files = {
        "q": q,
        "c": [{"question_id": i, "text": "a tile", "type": "Breast"} for i in range(3)],
        "a1": [{"question_id": i, "text": "reference"} for i in range(3)],
        "a2": [{"question_id": i, "text": "model"} for i in range(3)],
    }
    for k, v in files.items():
        (tmp_path / f"{k}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in v))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qllava.cli",
            "review",
            "-q",
            tmp_path / "q.jsonl",
            "-c",
            tmp_path / "c.jsonl",
            "-a",
            tmp_path / "a1.jsonl",
            tmp_path / "a2.jsonl",
            "-o",
            tmp_path / "r.jsonl",
            "--base-url",
            server + "/v1",
            "--model",
            "tiny",
        ],
        env={**env, "OPENAI_API_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode in (0, 1), r.stderr
    reviews = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(reviews) == 3 and all(rv.get("content") is not None for rv in reviews)


def test_terminal_chat_streams_answers_through_a_pipe(bed):
    d, qs, ref, env = bed
    q = qs[0]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qllava.cli",
            "chat",
            "--model-path",
            d / "ckpt",
            "--image",
            d / "img" / q["image"],
            "--max-new-tokens",
            "24",
        ],
        input=f"{q['text']}\n/reset\n/exit\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"ASSISTANT: {ref[q['question_id']]}" and lines[1] == "(conversation cleared)"
