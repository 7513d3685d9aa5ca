"""Input ids and labels against LLaVA-NeXT's own `preprocess_llama3` / `preprocess_qwen` (issue 19).

`parity/llava_next_fixture.json.gz` was written by LLaVA-NeXT's code itself (LLaVA-VL/LLaVA-NeXT at df17966, unmodified,
in a scratch venv: `tests/parity/make_llava_next_fixture.sh`) on the real Llama-3.1 and Qwen2.5 vocabularies, for the
demo records (pathology, IMU) and the 46-record real-vocabulary set: 651 records per case.

- `llama_3` vs `llama3-template` (LLaVA-NeXT's `llava_llama_3` with Meta-Llama-3-8B-Instruct's template, as
  llama3-llava-next-8b trained) and `qwen_2` vs `qwen2` (its `qwen_1_5` format, Qwen2's tokenizer config): input ids
  equal on every record.
- Labels differ by design, and the test pins the difference: the original also supervises the role headers of the
  assistant turns (`<|start_header_id|>assistant<|end_header_id|>\\n\\n`, `<|im_start|>assistant\\n`) and the structural
  tokens of every turn, prompts included (`<|begin_of_text|>`, `<|start_header_id|>`, `<|end_header_id|>`,
  `<|eot_id|>`; `<|im_start|>`, `<|im_end|>`, a lone `\\n`): it teaches the model to write the user's header too.
  qllava supervises each answer and its end-of-turn token, and only those: every label of ours is one of the
  original's, and every extra label of the original's is one of those tokens.
- One deliberate difference, tested: a human turn that already starts with `<image>` keeps its surrounding whitespace
  in LLaVA-NeXT (its `preprocess_multimodal` moves and strips only a placeholder that is not first); qllava strips it
  as LLaVA-1.5 does. One record has such a turn (`mr2-trailing-spaces`, "What is this?  "); Llama-3's template trims
  every message anyway, so only `qwen_2` shows it.
- The original's bugs, tested as bugs: with Llama-3.1's own template (`llama3.1-template`) every turn gets a dated
  system block of its own (it renders each message alone through a template that always opens with one); with the hub
  Qwen2.5 config (`qwen2.5-as-given`) every record raises (`additional_special_tokens_ids` must be exactly 2).
"""
import gzip, json
from pathlib import Path
import pytest
from transformers import AutoTokenizer

from qllava.core import ConfigError
from qllava.data.tokenize import IGNORE_INDEX, media_token_id, prepare_tokenizer, tokenize_conversations
from qllava.testing.vocab import hub_tokenizer_dir

HERE = Path(__file__).parent
FIXTURE = HERE / "parity" / "llava_next_fixture.json.gz"
if not FIXTURE.exists(): pytest.skip(f"{FIXTURE} is missing: run tests/parity/make_llava_next_fixture.sh", allow_module_level=True)
FIX = json.loads(gzip.decompress(FIXTURE.read_bytes()))
CASES = {c["name"]: c for c in FIX["cases"]}
REPO = {"meta-llama--Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B-Instruct", "Qwen--Qwen2.5-7B-Instruct": "Qwen/Qwen2.5-7B-Instruct"}
LLAMA_EXTRA = {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "assistant", "ĊĊ"}
QWEN_EXTRA = {"<|im_start|>", "<|im_end|>", "Ċ", "ĊĊ", "assistant"}


def _tok(case):
    try: folder = hub_tokenizer_dir(REPO[case["tokenizer"]], build=False)
    except ConfigError: pytest.skip("the real tokenizers are not built: run `make vocab` first")
    return prepare_tokenizer(AutoTokenizer.from_pretrained(folder))


def _records(case):
    out = []
    for r in case["records"]:
        rec = json.loads((HERE.parent / r["file"]).read_text())[r["index"]]
        conv = rec["conversations"]
        out.append(conv[1:] if conv[0]["from"] == "gpt" else conv)   # the original drops a leading gpt turn
    return out


def _ours(case, template):
    tok = _tok(case)
    samples = tokenize_conversations(_records(case), tok, template, {"image": 1, "sensor": 1}, None)
    media = {media_token_id(tok, "image"), media_token_id(tok, "sensor")}
    return tok, [([-200 if i in media else i for i in s.input_ids.tolist()], s.labels.tolist()) for s in samples]


@pytest.mark.parametrize("name,template,extra", [("llama3-template", "llama_3", LLAMA_EXTRA), ("qwen2", "qwen_2", QWEN_EXTRA)])
def test_ids_equal_llava_next_and_labels_are_its_answer_labels(name, template, extra):
    case = CASES[name]
    tok, ours = _ours(case, template)
    n_extra, kept_spaces = 0, []
    for (ids, labels), ref in zip(ours, case["records"]):
        where = f"record {ref['index']} ({ref['id']}) of {ref['file']}"
        if ids != ref["input_ids"] and ref["id"] == "mr2-trailing-spaces":   # the whitespace LLaVA-NeXT keeps (above)
            text = lambda xs: tok.decode([i for i in xs if i >= 0])
            assert text(ref["input_ids"]).replace("?  <|im_end|>", "?<|im_end|>") == text(ids)
            kept_spaces.append(ref["id"]); continue
        assert ids == ref["input_ids"], f"input ids differ from LLaVA-NeXT's at {where}"
        theirs = [i for i, l in enumerate(ref["labels"]) if l != IGNORE_INDEX]
        mine = [i for i, l in enumerate(labels) if l != IGNORE_INDEX]
        assert set(mine) <= set(theirs) and all(labels[i] == ref["labels"][i] for i in mine), where
        more = set(tok.convert_ids_to_tokens([ids[i] for i in set(theirs) - set(mine)]))
        assert more <= extra, f"{where}: the original also supervises {more - extra}"
        n_extra += len(set(theirs) - set(mine))
    assert len(ours) == case["n_records"] == 651 and n_extra > 0
    assert kept_spaces == ([] if template == "llama_3" else ["mr2-trailing-spaces"])


def test_llava_next_with_llama_3_1s_own_template_puts_a_dated_system_block_before_every_turn():
    case = CASES["llama3.1-template"]
    tok = _tok(case)
    for ref, conv in zip(case["records"], _records(case)):
        text = tok.decode([i for i in ref["input_ids"] if i != -200])
        assert text.count("Cutting Knowledge Date") == 1 + len(conv), ref["id"]


def test_llava_next_cannot_train_with_the_hub_qwen2_5_config():
    case = CASES["qwen2.5-as-given"]
    assert case["n_error"] == case["n_records"] == 651
    assert "not enough values to unpack" in json.dumps(case["errors"][:1])
