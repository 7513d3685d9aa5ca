"""An exported model answers as ours, through plain transformers and the exported chat template.

For the tiny demo model (demo vocabulary), Vicuna's real LLaMA-2 vocabulary with the QuiltNet-B-32 tower, and the
CLIP-L/336 tower (the test bed's hub-shaped stand-ins), and every conversation template: `export_hf`, then
`processor.apply_chat_template` gives our prompt text, `processor(text=..., images=...)` gives our ids (the text after
an image tokenised as training did), and `generate` on the exported `LlavaForConditionalGeneration`, batched with the
exported left padding, gives the greedy answers of `qllava.modeling.generate.answer_batch` on every question.
"""
import json
import pytest

from qllava.testing.testbed import build_testbed, run_with_testbed

TEMPLATES = ["plain", "vicuna_v1", "llama_2", "mistral_instruct", "llava_llama_2", "chatml"]
SETUPS = {"tiny": ("preset:tiny-llama", "preset:tiny-clip", TEMPLATES),
          "quiltnet-realvocab": ("lmsys/vicuna-7b-v1.5", "wisdomik/QuiltNet-B-32", TEMPLATES),
          "clip-l": ("lmsys/vicuna-7b-v1.5", "openai/clip-vit-large-patch14-336", ["vicuna_v1", "chatml"]),
          # current backbones on their real vocabularies: the model's own chat template (auto) and LLaVA-NeXT's format
          "llama31": ("meta-llama/Llama-3.1-8B-Instruct", "wisdomik/QuiltNet-B-32", ["auto", "llama_3"]),
          "qwen25": ("Qwen/Qwen2.5-7B-Instruct", "wisdomik/QuiltNet-B-32", ["auto", "qwen_2"])}

CODE = r'''
import json, tempfile, torch, numpy as np
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
from qllava.modeling.model import build_model
from qllava.modeling.checkpoint import export_hf
from qllava.data.conversation import generation_prompt, get_template
from qllava.modeling.generate import answer_batch, encode_prompts, Decoding
SETUPS = json.loads(%r)
QS = ["What is shown?", " Describe the tissue.", "Is it stained?\n", "nuclei?", "What stain is used?",
      "Name the organ.", "Is there necrosis?", "What colour dominates?", "Count the glands."]
rng = np.random.default_rng(0)
PILS = [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56 - 4 * i, 3), dtype=np.uint8)) for i in range(len(QS))]
out = {}
for name, (llm, tower, templates) in SETUPS.items():
    for t in templates:
        model, tok = build_model(llm, {"image": tower}, template=t, seed=1)
        model.eval()
        qs = QS[:3] if t == "plain" else QS
        ours_text = [generation_prompt(get_template(t, tok), "<image>\n" + q) for q in qs]
        ours_ids = [encode_prompts(tok, [p], model.config)[0][0].tolist() for p in ours_text]
        ours_ans = answer_batch(model, tok, ours_text, [model.encoders["image"].processor(p) for p in PILS[:len(qs)]],
                                Decoding(max_new_tokens=6))
        with tempfile.TemporaryDirectory() as d:
            export_hf(model, d, tokenizer=tok)
            proc = AutoProcessor.from_pretrained(d, use_fast=False)
            hf = LlavaForConditionalGeneration.from_pretrained(d).eval()
            msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in qs]
            texts = [proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
            ids = [proc(text=x, images=p).input_ids[0] for x, p in zip(texts, PILS)]
            ids = [list(map(int, i)) for i in ids]
            enc = proc(text=texts, images=PILS[:len(qs)], padding=True, return_tensors="pt")
            with torch.no_grad(): gen = hf.generate(**enc, max_new_tokens=6, do_sample=False)
            hf_ans = [a.strip() for a in proc.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)]
        out[f"{name}/{t}"] = {"text": texts == ours_text, "ids": ids == ours_ids, "answers": [ours_ans, hf_ans],
                              "vocab": len(tok)}
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    build_testbed(cache)
    r = run_with_testbed(cache, CODE % json.dumps(SETUPS), timeout=900)
    return json.loads(r.stdout.split("RESULT ", 1)[1])


@pytest.mark.parametrize("case", [f"{n}/{t}" for n, (_, _, ts) in SETUPS.items() for t in ts])
def test_exported_model_prompts_tokenises_and_answers_as_ours(results, case):
    r = results[case]
    assert r["text"], "processor.apply_chat_template differs from generation_prompt"
    assert r["ids"], "the processor's ids differ from training's"
    ours, theirs = r["answers"]
    assert theirs == ours
    assert any(ours)                                          # not all empty: the comparison means something
    if case.startswith(("quiltnet", "clip-l")): assert r["vocab"] >= 32000   # the real LLaMA-2 vocabulary
    if case.startswith(("llama31", "qwen25")): assert r["vocab"] >= 128256   # Llama-3.1's / Qwen2.5's
