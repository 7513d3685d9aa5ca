"""The README's Quilt-LLaVA recipe on hub ids, offline: `papermill nbs/train.ipynb ... -p model_name_or_path lmsys/vicuna-7b-v1.5
-p vision_tower wisdomik/QuiltNet-B-32` against a local Hugging Face cache in the real hub layout (`qllava.testing.testbed`: the
real LLaMA-2 / Vicuna v1.5 tokenizer, a shrunken LLaMA and a shrunken QuiltNet-B-32 with random weights), through the
real DeepSpeed launcher with 2 CPU ranks: stage 1, stage 2 full and LoRA, then `qllava answer` and `qllava metrics`.

What it proves, beyond the presets: the model's own tokenizer is used and saved (32000 pieces + the placeholders,
never the demo's 1185), the LLM keeps its vocabulary, hub ids resolve from the cache with HF_HUB_OFFLINE=1, and the
answers decode to real text.
"""
import json, os, subprocess, sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(1800)
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
LLM, TOWER = "lmsys/vicuna-7b-v1.5", "wisdomik/QuiltNet-B-32"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    "The hub cache and the environment a user would have after downloading the recipe's models."
    from qllava.testing.testbed import build_testbed, testbed_env
    cache = tmp_path_factory.mktemp("hf") / "hub"
    build_testbed(cache)
    return cache, {**os.environ, **testbed_env(cache)}


def papermill(env, out, **params):
    "Run the train notebook in a fresh kernel under `env` (huggingface_hub reads HF_HUB_CACHE at import)."
    args = [x for k, v in params.items() for x in ("-p", k, str(v))]
    r = subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "nbs" / "train.ipynb"), str(out), *args, "--cwd", str(out.parent)],
                       env={**env, "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def recipe(hub, tmp_path_factory):
    "Stage 1, then stage 2 full and LoRA from its projector, as the README's commands run them."
    from qllava.data.presets import demo_paths
    cache, env = hub
    d, work = demo_paths("pathology"), tmp_path_factory.mktemp("recipe")
    runs = work / "runs"
    common = dict(model_name_or_path=LLM, vision_tower=TOWER, image_folder=d["media_folder"], runs_dir=runs, global_batch_size=16,
                  num_train_epochs=1, model_max_length=512, blank_media_control=False, num_gpus=2)
    papermill(env, work / "pre.ipynb", stage="pretrain", data_path=d["pretrain"], learning_rate=1e-3, run_name="pre", **common)
    adapter = runs / "pre" / "mm_projector.bin"
    papermill(env, work / "ft.ipynb", stage="finetune", data_path=d["finetune"], pretrain_mm_mlp_adapter=adapter,
              learning_rate=1e-4, run_name="ft", **common)
    papermill(env, work / "lora.ipynb", stage="lora", data_path=d["finetune"], pretrain_mm_mlp_adapter=adapter,
              learning_rate=1e-3, lora_r=8, lora_alpha=16, run_name="lora", **common)
    papermill(env, work / "qlora.ipynb", stage="qlora", data_path=d["finetune"], pretrain_mm_mlp_adapter=adapter,
              learning_rate=1e-3, lora_r=8, lora_alpha=16, run_name="qlora", **common)  # bitsandbytes' 4-bit on CPU
    return work, runs, env


def test_every_stage_used_the_models_own_tokenizer_and_the_hub_ids(recipe):
    work, runs, env = recipe
    for name in ("pre", "ft", "lora", "qlora"):
        run = json.loads((runs / name / "run.json").read_text())
        cfg = run["stages"][-1]["config"]
        assert cfg["model_name_or_path"] == LLM and cfg["vision_tower"] == TOWER and cfg["tokenizer"] is None
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(runs / "ft")  # the tokenizer saved with the stage-2 checkpoint
    assert len(tok) == 32002 and tok.convert_tokens_to_ids(["<image>", "<sensor>"]) == [32000, 32001]
    assert tok("Hello world").input_ids == [1, 15043, 3186] and tok.legacy is False  # Vicuna v1.5's, not the demo's
    sd_keys = json.loads((runs / "ft" / "config.json").read_text())
    assert sd_keys["text_config"]["vocab_size"] == 32002  # grown by the two placeholders, never shrunk to the demo's 1185
    code = ("from qllava.modeling.checkpoint import load_model; m, t = load_model(%r); "
            "print(m.llm.get_input_embeddings().weight.shape[0], m.config.encoder_num_tokens['image'], len(t))" % str(runs / "ft"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)   # the hub ids resolve offline
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-3:] == ["32002", "49", "32002"]
    assert (runs / "lora" / "adapter" / "adapter_config.json").exists()


def test_qlora_trains_lora_adapters_on_a_4bit_nf4_base_on_cpu(recipe):
    "QLoRA for real on CPU: bitsandbytes' NF4 with double quantisation under every linear layer of the shrunken Vicuna."
    work, runs, env = recipe
    summary = json.loads((runs / "qlora" / "run.json").read_text())["stages"][-1]["summary"]
    q = summary["quantization"]
    assert q["bits"] == 4 and q["quant_type"] == "nf4" and q["double_quant"] is True
    assert q["quantized_linear_layers"] >= 7 * 2, q   # q, k, v, o, gate, up, down in each of the layers
    assert (runs / "qlora" / "adapter" / "adapter_model.safetensors").exists() and summary["final_loss"] > 0
    assert summary["trainable"]["llm"]["trainable"] < summary["trainable"]["llm"]["total"]  # adapters only


def test_answers_decode_to_real_text_and_are_scored(recipe):
    from qllava.data.presets import demo_paths
    work, runs, env = recipe
    d = demo_paths("pathology")
    for name in ("ft", "lora", "qlora"):
        ans = work / f"answers-{name}.jsonl"
        r = subprocess.run([sys.executable, "-m", "qllava.cli", "answer", "--model-path", str(runs / name), "--question-file",
                            str(d["eval_questions"]), "--image-folder", str(d["media_folder"]), "--answers-file", str(ans),
                            "--max_new_tokens", "12", "--batch-size", "16"], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = [json.loads(l) for l in ans.read_text().splitlines()]
        n_q = sum(1 for l in d["eval_questions"].read_text().splitlines() if l.strip())
        assert len(rows) == n_q and all(isinstance(x["text"], str) for x in rows)
        words = " ".join(x["text"] for x in rows)
        assert sum(c.isalpha() for c in words) > 100, words[:300]   # real vocabulary text, not ids or empty strings
        m = subprocess.run([sys.executable, "-m", "qllava.cli", "metrics", "--gt", str(d["eval_gt"]), "--pred", str(ans), "--quilt", "--json"],
                           env=env, capture_output=True, text=True)
        assert m.returncode == 0, m.stderr[-2000:]
        scores = json.loads(m.stdout)
        assert scores and all(v is None or isinstance(v, (int, float, dict)) for v in scores.values())
