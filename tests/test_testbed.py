"""The offline hub test bed (qllava.testing.testbed): the cache is built once into a temporary folder, then every repository is
loaded by its hub id in fresh processes pointed at it with HF_HUB_CACHE + HF_HUB_OFFLINE, through transformers,
open_clip and qllava's own resolution of the Quilt-LLaVA recipe's ids."""
import os, subprocess, sys

import pytest

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
import qllava.testing.testbed as tb   # a module import: pytest would collect the functions named testbed_* as tests
from qllava.testing.testbed import (LLAMA2_TOKENIZER_MODEL_SHA256, TESTBED_REPOS, blob_name, build_testbed, check_testbed,
                            hub_repo_dir, llama2_tokenizer_dir, run_with_testbed, sha256_file, varied_strings)

KNOWN = {"Hello world": [1, 15043, 3186], "2023": [1, 29871, 29906, 29900, 29906, 29941], "\n": [1, 29871, 13]}
SPECIAL_TEXT = ("<s>", "</s>", "<unk>")   # SentencePiece reads these as plain text, transformers as special tokens


def _spacey(s):
    "Text where transformers 5's conversion of tokenizer.model can differ: leading space, repeated spaces, a literal '▁'."
    return s.startswith((" ", "▁")) or "  " in s or "▁" in s


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    c = tmp_path_factory.mktemp("testbed") / "hub"
    build_testbed(c)
    return c


@pytest.fixture(scope="module")
def checks(cache):
    return check_testbed(cache)


@pytest.fixture(scope="module")
def plain(checks):
    "(string, fast ids, SentencePiece ids) for the varied strings that hold no special-token text."
    t = checks["tokenizer"]
    return [(s, f, p) for s, f, p in zip(varied_strings(), t["fast"], t["sentencepiece"]) if not any(x in s for x in SPECIAL_TEXT)]


def test_hub_layout(cache):
    for repo in TESTBED_REPOS:
        d = hub_repo_dir(cache, repo)
        rev = tb.testbed_revision(repo)
        assert (d / "refs" / "main").read_text() == rev and len(rev) == 40
        files = list((d / "snapshots" / rev).iterdir())
        assert files and all(f.is_symlink() and f.resolve().parent == (d / "blobs").resolve() for f in files)
        for f in files: assert f.resolve().name == blob_name(f.name, f.read_bytes())
    snap = hub_repo_dir(cache, "lmsys/vicuna-7b-v1.5") / "snapshots" / tb.testbed_revision("lmsys/vicuna-7b-v1.5")
    assert sorted(p.name for p in snap.iterdir()) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                                      "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    assert sha256_file(snap / "tokenizer.model") == LLAMA2_TOKENIZER_MODEL_SHA256 == sha256_file(llama2_tokenizer_dir() / "tokenizer.model")


def test_env(cache, checks):
    env = tb.testbed_env(cache)
    assert env["HF_HUB_CACHE"] == str(cache.resolve()) and env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert checks["hub_cache"] == str(cache.resolve()) and checks["offline"] is True


def test_tokenizer_by_hub_id(checks):
    t = checks["tokenizer"]
    assert t["is_fast"] and t["cls"] == "LlamaTokenizer" and t["len"] == 32000
    assert (t["bos"], t["eos"], t["unk"], t["pad"], t["padding_side"], t["model_max_length"]) == (1, 2, 0, "<unk>", "right", 4096)
    assert t["known"] == KNOWN


def test_fast_matches_sentencepiece_except_spaces(plain):
    "The fast tokenizer equals SentencePiece (the original's slow LlamaTokenizer) on every string without leading or repeated spaces."
    assert len(plain) == 296
    assert [s for s, f, p in plain if f != p and not _spacey(s)] == []   # no other kind of divergence
    assert sum(not _spacey(s) for s, f, p in plain) > 150


def test_qllava_tokenizes_as_sentencepiece_everywhere(plain):
    "transformers 5 alone differs from SentencePiece on spaces (above); qllava's loading + chunked encoding does not."
    import sentencepiece as spm
    from qllava.data.presets import load_tokenizer
    from qllava.data.tokenize import encode_chunked
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_dir() / "tokenizer.model"))
    tok = load_tokenizer(str(llama2_tokenizer_dir()))
    # SentencePiece reads a placeholder as text; a literal "▁" in data (U+2581) is its own whitespace symbol (not compared)
    texts = [s for s, _, _ in plain if "<image>" not in s and "▁" not in s]
    ours = [ids for ids, _, _ in encode_chunked(tok, texts)]
    assert [t for t, o in zip(texts, ours) if o != [1] + sp.encode(t)] == []
    assert sum(f != p for _, f, p in plain) > 50   # raw transformers 5.24 differs (a canary: drop the fix when it stops)


def test_llm_by_hub_id(checks):
    m = checks["llm"]
    assert (m["cls"], m["dtype"], m["logits"], m["max_positions"], m["eos"]) == ("LlamaForCausalLM", "float16", [1, 3, 32000], 4096, 2)


def test_open_clip_and_clip_by_hub_id(checks):
    assert checks["quiltnet"]["cls"] == "CLIP" and checks["quiltnet"]["image_embedding"] == [2, 32] and checks["quiltnet"]["width"] == 64
    assert checks["clip_l336"]["last_hidden_state"] == [2, 577, 96]


QLLAVA_CODE = """
import json, torch
from qllava.core import CheckpointError
from qllava.modeling.encoders import build_encoder
from qllava.data.presets import load_tokenizer
out = {}
for spec in ("wisdomik/QuiltNet-B-32", "hf-clip:openai/clip-vit-large-patch14-336", "openai/clip-vit-large-patch14-336"):
    e = build_encoder(spec)
    with torch.no_grad(): y = e(e.dummy_input(3))
    out[spec] = dict(spec=e.spec, shape=list(y.shape), tokens=e.num_tokens, size=e.media["image_size"], mean=list(e.media["image_mean"]))
try: build_encoder("openai/clip-vit-base-patch32"); out["missing"] = "loaded?!"
except CheckpointError as err: out["missing"] = str(err)
tok = load_tokenizer("lmsys/vicuna-7b-v1.5")
out["ids"] = [tok(s).input_ids for s in ("Hello world", "2023", "\\n")]
print("RESULT " + json.dumps(out))
"""


def test_qllava_resolves_recipe_ids_offline(cache):
    import json
    r = run_with_testbed(cache, QLLAVA_CODE, timeout=600)
    out = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    q = out["wisdomik/QuiltNet-B-32"]
    assert (q["spec"], q["shape"], q["tokens"], q["size"]) == ("open_clip:hf-hub:wisdomik/QuiltNet-B-32", [3, 49, 64], 49, 224)
    for spec in ("hf-clip:openai/clip-vit-large-patch14-336", "openai/clip-vit-large-patch14-336"):
        c = out[spec]
        assert (c["spec"], c["shape"], c["tokens"], c["size"]) == ("hf-clip:openai/clip-vit-large-patch14-336", [3, 576, 96], 576, 336)
        assert c["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert "openai/clip-vit-base-patch32" in out["missing"] and "HF_HUB_OFFLINE" in out["missing"]   # absent from the cache: a clear error
    assert out["ids"] == list(KNOWN.values())


def test_deterministic_and_cli(cache, tmp_path):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "qllava.cli", "make-testbed", str(tmp_path), "--repos", "wisdomik/QuiltNet-B-32",
                        "openai/clip-vit-large-patch14-336"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"export HF_HUB_CACHE={tmp_path.resolve()}" in r.stdout and "export HF_HUB_OFFLINE=1" in r.stdout
    for repo in ("wisdomik/QuiltNet-B-32", "openai/clip-vit-large-patch14-336"):
        rel = os.path.join("snapshots", tb.testbed_revision(repo))
        a, b = hub_repo_dir(cache, repo) / rel, hub_repo_dir(tmp_path, repo) / rel
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for p in a.iterdir(): assert (b / p.name).read_bytes() == p.read_bytes(), p.name   # same seed, same bytes
