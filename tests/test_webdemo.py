"""`qllava demo` in a real browser (issue 21): headless Chromium (Debian's `chromium`, installed by .ci/run) driven by
Playwright uploads a tissue tile, asks a question, and reads the streamed answer from the page: it must equal `qllava
answer`'s for the same image and question; a follow-up keeps the conversation; an example tile starts a new one."""

import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest

from qllava.serving.serve import free_port, wait_until_up

pytestmark = pytest.mark.timeout(900)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
QUESTION = "Is the brown DAB staining strong in this tile?"
pytest.importorskip("playwright", reason="playwright (the dev extra) is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip(
        f"no Chromium at {CHROMIUM}: install Debian's chromium (.ci/run does) to run the browser test",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from qllava.modeling.model import build_model
    from qllava.modeling.checkpoint import save_checkpoint
    from qllava.serving.webdemo import example_media

    d = tmp_path_factory.mktemp("webdemo")
    model, tok = build_model(seed=0)
    save_checkpoint(model, d / "ckpt", tokenizer=tok)
    tile = Path(example_media("image")[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    (d / "q.jsonl").write_text(json.dumps({"question_id": 0, "image": tile.name, "text": QUESTION}) + "\n")
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
            tile.parent,
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
    expected = json.loads((d / "a.jsonl").read_text())["text"]
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qllava.cli",
            "demo",
            "--model-path",
            d / "ckpt",
            "--port",
            str(port),
            "--max-new-tokens",
            "24",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = wait_until_up(f"http://127.0.0.1:{port}/", proc)
    yield url, tile, expected
    proc.terminate()
    proc.wait(30)


def test_upload_ask_and_read_the_answer_in_the_browser(site, tmp_path):
    from playwright.sync_api import sync_playwright

    url, tile, expected = site
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        page = browser.new_page()
        page.goto(url, wait_until="domcontentloaded")
        page.locator("#media input[type=file]").set_input_files(str(tile))
        page.wait_for_timeout(1500)  # the upload reaches the server (a new conversation)
        page.locator("#question textarea").fill(QUESTION)
        page.locator("#ask").click()
        last = page.locator("#last-answer textarea")
        page.wait_for_function(
            "() => document.querySelector('#last-answer textarea').value.length > 0", timeout=120_000
        )
        assert last.input_value() == expected
        shown = page.locator("#conversation").inner_text()
        assert QUESTION in shown and " ".join(expected.split())[:20] in " ".join(shown.split())
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        page.locator("#question textarea").fill("And the nuclei?")  # a follow-up: the conversation grows
        page.locator("#ask").click()
        page.wait_for_function(
            "() => document.querySelector('#conversation').innerText.includes('And the nuclei?')", timeout=120_000
        )
        browser.close()
    assert (tmp_path / "demo.png").stat().st_size > 5000
