"""Current LLM backbones on their real vocabularies (issue 19): the tokenizers built from llama.cpp's GGUF files,
`auto` (the model's own chat template) against transformers' `apply_chat_template`, the named templates, and the choice
of a template when none is named. The vocabularies come from `make vocab` (run by `make test`); without them these skip."""
import pytest
from transformers import AutoTokenizer
from qllava.data.conversation import TEMPLATES, generation_prompt, get_template
from qllava.core import ConfigError
from qllava.data.tokenize import IGNORE_INDEX, pick_template, prepare_tokenizer, tokenize_conversation
from qllava.testing.vocab import HUB_VOCABS, check_hub_tokenizer, fetch_llama_cpp_models, hub_tokenizer_dir, vocab_cache

LLAMA3, QWEN25, QWEN3, PHI35 = "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen3-8B", \
    "microsoft/Phi-3.5-mini-instruct"
END_OF_TURN = {LLAMA3: "<|eot_id|>", QWEN25: "<|im_end|>\n", QWEN3: "<|im_end|>\n", PHI35: "<|end|>"}
CONV = [{"from": "human", "value": "What is shown here?"}, {"from": "gpt", "value": "A gland with mucin."},
        {"from": "human", "value": "Is it benign?"}, {"from": "gpt", "value": "Yes, it looks benign."}]


def _dir(repo):
    try: return hub_tokenizer_dir(repo, build=False)
    except ConfigError: pytest.skip(f"{repo}'s tokenizer is not built in {vocab_cache()}: run `make vocab` first")


@pytest.fixture(scope="module")
def toks():
    return {r: prepare_tokenizer(AutoTokenizer.from_pretrained(_dir(r))) for r in HUB_VOCABS}


def _messages(conv):
    return [{"role": ("user", "assistant")[i % 2], "content": t["value"]} for i, t in enumerate(conv)]


@pytest.mark.parametrize("repo", list(HUB_VOCABS))
def test_built_tokenizer_gives_llama_cpp_expected_ids(repo):
    info = check_hub_tokenizer(repo, _dir(repo), models=fetch_llama_cpp_models())
    assert info["chat_template"] and info["cases"] >= 40
    assert info["tokens"] == {LLAMA3: 128256, QWEN25: 151665, QWEN3: 151669, PHI35: 32011}[repo]


@pytest.mark.parametrize("repo", list(HUB_VOCABS))
def test_auto_is_the_models_own_template_and_supervises_answers_with_their_end_of_turn(toks, repo):
    tok = toks[repo]
    t = get_template("auto", tok)
    s = tokenize_conversation(CONV, tok, t, {"image": 4}, None)
    want = tok.apply_chat_template(_messages(CONV), tokenize=True, return_dict=False)
    assert s.input_ids.tolist() == want
    sup = [i for i, l in zip(s.input_ids.tolist(), s.labels.tolist()) if l != IGNORE_INDEX]
    eot = END_OF_TURN[repo]
    assert tok.decode(sup) == "".join(c["value"] + eot for c in CONV[1::2]).replace("\n", "" if repo == PHI35 else "\n")
    gen = tok(generation_prompt(t, "Is it benign?", CONV[:2]), add_special_tokens=True).input_ids
    # Qwen3: answers without thinking, so the generation prompt holds the empty think block its training text has
    assert gen == tok.apply_chat_template(_messages(CONV[:3]), tokenize=True, add_generation_prompt=True, return_dict=False,
                                          enable_thinking=False)
    assert eot.strip() in t.stop_strings and len(tok.encode(eot.strip(), add_special_tokens=False)) == 1


@pytest.mark.parametrize("repo", [LLAMA3, QWEN25])
def test_auto_with_an_image_gives_the_ids_of_the_whole_text_on_byte_level_vocabularies(toks, repo):
    tok = toks[repo]
    conv = [{"from": "human", "value": "What is shown? <image>"}, CONV[1]]
    s = tokenize_conversation(conv, tok, get_template("auto", tok), {"image": 1}, None)
    msgs = [{"role": "user", "content": "<image>\nWhat is shown?"}, {"role": "assistant", "content": CONV[1]["value"]}]
    assert s.input_ids.tolist() == tok.apply_chat_template(msgs, tokenize=True, return_dict=False)


@pytest.mark.parametrize("name,repo,one_token", [("llama_3", LLAMA3, "<|eot_id|>"), ("qwen_2", QWEN25, "<|im_end|>"),
                                                 ("phi_3", PHI35, "<|end|>")])
def test_named_templates_end_answers_with_the_backbones_own_token(toks, name, repo, one_token):
    tok = toks[repo]
    n = len(tok)
    s = tokenize_conversation(CONV, prepare_tokenizer(tok, template=name), name, {"image": 4}, None)
    assert len(tok) == n  # the end-of-turn token is the vocabulary's own: nothing added
    ids, labels = s.input_ids.tolist(), s.labels.tolist()
    end = tok.convert_tokens_to_ids(one_token)
    assert [l for l in labels if l != IGNORE_INDEX].count(end) == 2
    assert ids[0] == tok("").input_ids[0] if tok("").input_ids else True


def test_qwen_2_is_qwen2s_own_format_with_its_default_system_prompt(toks):
    tok = toks[QWEN25]
    msgs = [{"role": "system", "content": "You are a helpful assistant."}] + _messages(CONV)
    assert tokenize_conversation(CONV, tok, "qwen_2", {}, None).input_ids.tolist() == \
        tok.apply_chat_template(msgs, tokenize=True, return_dict=False)


def test_a_template_is_picked_from_the_tokenizer_or_refused_naming_the_templates(toks):
    from qllava.modeling.model import get_tokenizer
    assert pick_template(None, toks[LLAMA3]) == "auto" and pick_template(None, toks[QWEN25]) == "auto"
    assert pick_template(None, get_tokenizer("llama2-spm")) == "vicuna_v1"   # Vicuna ships no chat template: v1
    assert pick_template("llama_3", toks[LLAMA3]) == "llama_3"
    base = AutoTokenizer.from_pretrained(_dir(LLAMA3))
    base.chat_template = None   # a base model: no chat template, no </s>
    with pytest.raises(ConfigError) as e: pick_template(None, base)
    assert "--version" in str(e.value) and all(n in str(e.value) for n in ("llama_3", "qwen_2", "vicuna_v1"))
    with pytest.raises(ConfigError, match="ships no chat template"): get_template("auto", base)


def test_a_run_whose_tokenizer_has_no_template_is_refused_before_any_launch(tmp_path):
    from qllava.data.presets import demo_paths
    from qllava.workflows.runs import plan_training
    base = AutoTokenizer.from_pretrained(_dir(LLAMA3))
    base.chat_template = None   # a base model's tokenizer: no chat template, no </s>
    base.save_pretrained(tmp_path / "tok")
    d = demo_paths("pathology")
    (tmp_path / "mm_projector.bin").write_bytes(b"")   # planning only checks that it exists
    run = dict(stage="finetune", tokenizer=str(tmp_path / "tok"), data_path=str(d["finetune"]), runs_dir=str(tmp_path / "runs"),
               image_folder=str(d["media_folder"]), pretrain_mm_mlp_adapter=str(tmp_path / "mm_projector.bin"))
    with pytest.raises(ConfigError, match="ships no chat template and no --version") as e: plan_training(run)
    assert "llama_3" in str(e.value)
    plan = plan_training({**run, "extra_args": "--version llama_3"})
    assert "Stage 2 conversation template: llama_3 (as asked)." in plan.notes
    assert "Stage 2 conversation template: auto (the model's own chat template)." in \
        plan_training({**run, "tokenizer": str(_dir(LLAMA3))}).notes


CARD_CONVS = [CONV, CONV[:2], [{"from": "human", "value": " Padded question? "}, {"from": "gpt", "value": " Yes. "}]]


@pytest.mark.parametrize("name", ["mistral", "gemma"])
def test_named_mistral_and_gemma_render_as_their_model_cards(name):
    "No vocabulary of these models can be had here: the rendered text is checked against the cards' own templates."
    from transformers.utils.chat_template_utils import render_jinja_template
    from qllava.data.conversation import render, spans_text
    from qllava.testing.vocab import CARD_TEMPLATES
    try: card = (fetch_llama_cpp_models() / CARD_TEMPLATES[name]).read_text()
    except Exception as e: pytest.skip(f"the model cards' templates are not in {vocab_cache()} ({e}): run `make vocab`")
    t = get_template(name)
    def hf(conv, gen=False):   # the tokenizer adds the BOS, so the card's bos_token prints nothing
        out, _ = render_jinja_template(conversations=[_messages(conv)], chat_template=card, add_generation_prompt=gen,
                                       bos_token="", eos_token="</s>" if name == "mistral" else "<eos>")
        return out[0]
    for conv in CARD_CONVS:
        assert spans_text(render(t, conv)) == hf(conv)
        assert generation_prompt(t, conv[-2]["value"], conv[:-2]) == hf(conv[:-1], gen=True)
    sup = "".join(s.text for s in render(t, CONV) if s.supervised)
    end = {"mistral": "</s>", "gemma": "<end_of_turn>\n"}[name]
    assert sup == "".join(c["value"] + end for c in CONV[1::2]) and end.strip() in t.stop_strings


def test_qlora_under_zero3_is_refused_before_launch_naming_zero2(tmp_path):
    "The train notebook resolves its planned stages (the hyperparameter table) before any launch: 4 bits + ZeRO-3 stop."
    from qllava.workflows.runs import plan_training, planned_hyperparameters
    plan = plan_training({"stage": "qlora", "deepspeed": "zero3", "runs_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="--deepspeed zero2"): planned_hyperparameters(plan)
    planned_hyperparameters(plan_training({"stage": "qlora", "deepspeed": "zero2", "runs_dir": str(tmp_path)}))
