"""The README's current-backbone recipes on the offline test bed, through the real DeepSpeed launcher (2 CPU ranks):
Quilt-LLaVA on `meta-llama/Llama-3.1-8B-Instruct` (QuiltNet-B-32; stage 1, then stage 2 in the model's own chat
template) and LLaSA on `Qwen/Qwen2.5-7B-Instruct` (the IMU demo, QLoRA on a 4-bit NF4 base). The stand-ins carry the
real tokenizers (`qllava make-vocab`) at a tiny width.

What it proves: the model's own vocabulary and template (`auto`) are used and saved; answers stop at the end-of-turn
token (`<|eot_id|>` / `<|im_end|>`) and decode to text, batch 16 equal to batch 1; the export (`qllava export-hf`)
gives our logits and our prompt through `processor.apply_chat_template`.
"""
import json, os, subprocess, sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(2400)
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
LLAMA3, QWEN25, TOWER = "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "wisdomik/QuiltNet-B-32"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from qllava.core import ConfigError
    from qllava.testing.testbed import build_testbed, testbed_env
    from qllava.testing.vocab import hub_tokenizer_dir, vocab_cache
    try: [hub_tokenizer_dir(r, build=False) for r in (LLAMA3, QWEN25)]
    except ConfigError: pytest.skip(f"the real tokenizers are not built in {vocab_cache()}: run `make vocab` first")
    cache = tmp_path_factory.mktemp("hf") / "hub"
    build_testbed(cache, [LLAMA3, QWEN25, TOWER])
    return cache, {**os.environ, **testbed_env(cache)}


def papermill(env, out, **params):
    args = [x for k, v in params.items() for x in ("-p", k, str(v))]
    nb = str(ROOT / "nbs" / "train.ipynb")
    cmd = [sys.executable, "-m", "papermill", nb, str(out), *args, "--cwd", str(out.parent)]
    path = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    r = subprocess.run(cmd, env={**env, "PATH": path}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def qllava(env, *args):
    r = subprocess.run([sys.executable, "-m", "qllava.cli", *map(str, args)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def runs(hub, tmp_path_factory):
    from qllava.data.presets import demo_paths, demo_subset
    cache, env = hub
    work = tmp_path_factory.mktemp("backbones")
    runs = work / "runs"
    p, imu = demo_paths("pathology"), demo_paths("imu")
    # one batch of short answers, learnt by heart: enough for a tiny model with a 128k-152k vocabulary to close its
    # answers
    tiles, windows = demo_subset("pathology", work / "tiles.json", 16), demo_subset("imu", work / "windows.json", 16)
    common = dict(runs_dir=runs, global_batch_size=16, model_max_length=512, blank_media_control=False, num_gpus=2)
    # the short names of earlier versions (model, encoder: now model_name_or_path, vision_tower) still run the notebook
    quilt = dict(common, model=LLAMA3, encoder=TOWER, image_folder=p["media_folder"])
    papermill(env, work / "pre.ipynb", stage="pretrain", data_path=tiles, learning_rate=1e-3, run_name="pre", **quilt)
    papermill(env, work / "ft.ipynb", stage="finetune", data_path=tiles, learning_rate=5e-3, num_train_epochs=40,
              pretrain_mm_mlp_adapter=runs / "pre" / "mm_projector.bin", run_name="ft", **quilt)
    llasa = dict(common, modality="sensor", model=QWEN25, data_path=windows, image_folder=imu["media_folder"])
    papermill(env, work / "llasa-pre.ipynb", stage="pretrain", learning_rate=1e-3, run_name="llasa-pre", **llasa)
    papermill(env, work / "llasa.ipynb", stage="qlora", learning_rate=5e-3, lora_r=8, lora_alpha=16,
              num_train_epochs=40,
              pretrain_mm_mlp_adapter=runs / "llasa-pre" / "mm_projector.bin", run_name="llasa", **llasa)
    return work, runs, env


def test_the_models_own_tokenizer_and_template_are_used_and_saved(runs):
    from transformers import AutoTokenizer
    work, runs, env = runs
    for name, llm, eot in (("ft", LLAMA3, "<|eot_id|>"), ("llasa", QWEN25, "<|im_end|>")):
        cfg = json.loads((runs / name / "run.json").read_text())["stages"][-1]["config"]
        assert cfg["model_name_or_path"] == llm and cfg["version"] == "auto"
    tok = AutoTokenizer.from_pretrained(runs / "ft")
    assert tok("Hello world").input_ids == [128000, 9906, 1917] and tok.convert_tokens_to_ids("<|eot_id|>") == 128009
    assert "Cutting Knowledge Date" in tok.chat_template   # the model card's own template travels with the checkpoint
    assert json.loads((runs / "ft" / "config.json").read_text())["stop_strings"] == ["<|eot_id|>"]
    from qllava.data.tokenize import prepare_tokenizer, tokenize_conversation
    from qllava.data.conversation import get_template
    from qllava.testing.vocab import hub_tokenizer_dir
    rec = json.loads((work / "tiles.json").read_text())[0]["conversations"]
    saved, hub = tok, prepare_tokenizer(AutoTokenizer.from_pretrained(hub_tokenizer_dir(LLAMA3, build=False)))
    ids = [tokenize_conversation(rec, t, get_template("auto", t), {"image": 49}, None) for t in (saved, hub)]
    assert ids[0].input_ids.tolist() == ids[1].input_ids.tolist()   # reloaded, the record tokenises as in training
    assert ids[0].labels.tolist() == ids[1].labels.tolist()
    pre = json.loads((runs / "pre" / "run.json").read_text())["stages"][-1]["config"]
    assert pre["version"] == "plain"   # stage 1 keeps the recipe's caption format


CHECK = r'''
import json, sys, torch
from qllava.evaluation.answer import load_answering_model, read_questions, question_text, load_batch_media
from qllava.data.conversation import generation_prompt, get_template
from qllava.modeling.generate import encode_prompts, collect_media, generation_config
model, tok = load_answering_model(sys.argv[1])
qs = read_questions(sys.argv[2])[:16]
t = get_template(model.config.template, tok)
prompts = [generation_prompt(t, question_text(q)) for q in qs]
media = load_batch_media(model, qs, sys.argv[3], False, sys.argv[2])
ids, mask = encode_prompts(tok, prompts, model.config)
gc = generation_config(tok, 48, stop_strings=list(model.config.stop_strings))
with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=mask, media=collect_media(model, media, prompts),
                         generation_config=gc, tokenizer=tok)
eot = tok.convert_tokens_to_ids(t.stop_strings[0])
ends = []
for row in out[:, ids.shape[1]:].tolist():
    row = [x for x in row if x != tok.pad_token_id]
    last = tok.convert_ids_to_tokens(row[-1:])
    ends.append("eot" if row and row[-1] == eot else "length" if len(row) == 48 else "other:%s" % last)
print("RESULT " + json.dumps({"ends": ends, "stop": t.stop_strings}))
'''


@pytest.mark.parametrize("name,demo", [("ft", "pathology"), ("llasa", "imu")])
def test_answers_stop_at_the_end_of_turn_token_and_batches_answer_as_one(runs, name, demo):
    from qllava.data.presets import demo_paths
    work, runs, env = runs
    d = demo_paths(demo)
    cmd = [sys.executable, "-c", CHECK, str(runs / name), str(d["eval_questions"]), str(d["media_folder"])]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert all(e in ("eot", "length") for e in res["ends"]), res   # generation ends only at the end-of-turn token
    assert res["ends"].count("eot") >= len(res["ends"]) // 2, res   # the model learnt to close its answers
    answers = {}
    for bs in (16, 1):
        f = work / f"answers-{name}-{bs}.jsonl"
        qllava(env, "answer", "--model-path", runs / name, "--question-file", d["eval_questions"], "--image-folder",
               d["media_folder"], "--answers-file", f, "--max_new_tokens", "24", "--batch-size", bs)
        answers[bs] = [json.loads(l)["text"] for l in f.read_text().splitlines()]
    assert answers[16] == answers[1]
    words = " ".join(answers[1])
    assert sum(c.isalpha() for c in words) > 50 and "<|" not in words, words[:300]


EXPORT = r'''
import json, sys, torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
from qllava.evaluation.answer import load_answering_model
from qllava.data.conversation import generation_prompt, get_template
from qllava.modeling.generate import encode_prompts, collect_media
model, tok = load_answering_model(sys.argv[1]); model.eval()
proc = AutoProcessor.from_pretrained(sys.argv[2])
hf = LlavaForConditionalGeneration.from_pretrained(sys.argv[2]).eval()
img = Image.open(sys.argv[3]).convert("RGB")
q = "What does this tissue show?"
ours = generation_prompt(get_template(model.config.template, tok), "<image>\n" + q)
theirs = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                  add_generation_prompt=True, tokenize=False)
enc = proc(text=theirs, images=img, return_tensors="pt")
ids, mask = encode_prompts(tok, [ours], model.config)
media = collect_media(model, [img], [ours])
with torch.no_grad():
    a = model(input_ids=ids, attention_mask=mask, media=media).logits[0]
    b = hf(**enc).logits[0]
    c = hf(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=media["image"]).logits[0]
print("RESULT " + json.dumps({"prompt": ours == theirs, "ids": enc.input_ids[0].tolist() == ids[0].tolist(),
                              "same_pixels": (a - c).abs().max().item(), "processor": (a - b).abs().max().item(),
                              "pixels": (media["image"] - enc.pixel_values).abs().max().item(),
                              "scale": a.abs().max().item(),
                              "shape": list(a.shape) == list(b.shape)}))
'''


def test_the_hf_export_prompts_and_computes_as_ours(runs):
    from qllava.data.presets import demo_paths
    work, runs, env = runs
    out = work / "ft-hf"
    qllava(env, "export-hf", runs / "ft", out)
    tiles = sorted(demo_paths("pathology")["media_folder"].rglob("*"))
    img = next(p for p in tiles if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    cmd = [sys.executable, "-c", EXPORT, str(runs / "ft"), str(out), str(img)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert res["prompt"] and res["ids"] and res["shape"], res
    assert res["same_pixels"] < 1e-4 * res["scale"], res   # the same pixels: the same logits (float32 round-off)
    # transformers' image processor resamples the tile into pixels within about one 8-bit level of training's (0.015
    # after normalisation), which moves the logits by that much and no more
    assert res["pixels"] < 0.02 and res["processor"] < 0.01 * res["scale"], res


def test_the_qlora_run_was_4bit_and_merges_into_a_full_checkpoint_that_answers(runs):
    from qllava.data.presets import demo_paths
    work, runs, env = runs
    q = json.loads((runs / "llasa" / "run.json").read_text())["stages"][-1]["summary"]["quantization"]
    assert q["bits"] == 4 and q["quant_type"] == "nf4" and q["double_quant"], q
    assert q["quantized_linear_layers"] >= 14, q
    qllava(env, "merge-lora", runs / "llasa", work / "llasa-merged")
    cfg = json.loads((work / "llasa-merged" / "config.json").read_text())
    assert cfg["template"] == "auto" and cfg["stop_strings"] == ["<|im_end|>"]
    d = demo_paths("imu")
    f = work / "answers-merged.jsonl"
    qllava(env, "answer", "--model-path", work / "llasa-merged", "--question-file", d["eval_questions"],
           "--image-folder", d["media_folder"], "--answers-file", f, "--max_new_tokens", "16")
    texts = [json.loads(l)["text"] for l in f.read_text().splitlines()]
    assert texts and sum(c.isalpha() for c in " ".join(texts)) > 50
