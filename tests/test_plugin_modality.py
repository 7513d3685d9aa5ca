"""A fourth modality, registered outside the library, through every command a user runs (issue 22's acceptance): its
registrations sit in a plugin file named by $QLLAVA_PLUGINS, which every qllava entry point imports, so `make-records`,
`validate-data`, DeepSpeed's two ranks, `answer` and `metrics` all know it, and no library file changes."""
import json, os, subprocess, sys
from pathlib import Path

import numpy as np

import qllava
from qllava.cluster.launch import LaunchSpec, launch

PLUGIN = '''
from torch import nn
from qllava.data.modality import Modality, register_modality
from qllava.modeling.encoders import Encoder, register_encoder_kind, seeded
from qllava.data.media import SensorProcessor
WINDOW = 64

class SpectrumEncoder(Encoder):
    "A strided 1-D convolution over a 2-channel window: 8 tokens of 16 features."
    def __init__(self, spec):
        super().__init__(spec, "spectrum", 16, WINDOW // 8, dict(window=WINDOW, channels=2), select_layer=-1, select_feature="patch")
        self.conv = nn.Conv1d(2, 16, 8, stride=8)
    def features(self, x): return self.conv(x.transpose(1, 2)).transpose(1, 2)

register_modality(Modality("spectrum", "<spectrum>", record_key="spectrum_file", batch_key="spectra",
                           make_processor=lambda m: SensorProcessor(m["window"], m["channels"]),
                           input_shape=lambda m: (m["window"], m["channels"]), suffixes=(".spec.npy",)))

def build(target, spec, select_layer=None, select_feature="patch", **kw):
    with seeded(0): return SpectrumEncoder(spec)

register_encoder_kind("spec-conv", build=build, modality="spectrum", syntax="spec-conv:tiny",
                      num_tokens=lambda target, select_layer, select_feature: WINDOW // 8)
'''


def _qllava(*args, env):
    r = subprocess.run([sys.executable, "-m", "qllava.cli", *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def _windows(folder:Path, n:int) -> Path:
    "n (64, 2) windows, slow or fast oscillations, listed in a table whose media column is the modality's name."
    rng, rows = np.random.default_rng(0), []
    (folder / "spec").mkdir(parents=True)
    t = np.arange(64)[:, None]
    for i in range(n):
        fast = i % 2
        x = np.sin(t * (0.9 if fast else 0.15) + rng.uniform(0, 6, (1, 2))) + 0.1 * rng.standard_normal((64, 2))
        np.save(folder / "spec" / f"{i:03d}.spec.npy", x.astype(np.float32))
        rows.append(f"{i:03d}.spec.npy,Is it fast?,{'yes' if fast else 'no'}")
    (folder / "table.csv").write_text("spectrum,question,answer\n" + "\n".join(rows) + "\n")
    return folder / "table.csv"


def test_a_plugin_modality_is_converted_validated_trained_on_two_ranks_answered_and_scored(tmp_path):
    (tmp_path / "spectrum_plugin.py").write_text(PLUGIN)
    env = {**os.environ, "QLLAVA_PLUGINS": str(tmp_path / "spectrum_plugin.py")}
    media, recs = tmp_path / "spec", tmp_path / "records"
    _qllava("make-records", _windows(tmp_path, 40), "--media-folder", media, "--out", recs, "--modality", "spectrum",
            "--eval-fraction", "0.25", env=env)
    train = json.loads((recs / "finetune.json").read_text())
    assert len(train) == 30 and all("spectrum_file" in r and r["conversations"][0]["value"].startswith("<spectrum>\n") for r in train)
    out = _qllava("validate-data", recs / "finetune.json", "--media-folder", media, "--encoder", "spectrum=spec-conv:tiny",
                  "--max-length", "128", "--json", env=env)
    assert json.loads(out)["settings"]["media_tokens"]["spectrum"] == 8
    run = tmp_path / "run"
    launch(["-m", "qllava.training.train", "--stage", "finetune", "--encoders", json.dumps({"spectrum": "spec-conv:tiny"}),
            "--media_folders", json.dumps({"spectrum": str(media)}), "--data_path", str(recs / "finetune.json"),
            "--output_dir", str(run), "--model_max_length", "128", "--global_batch_size", "8", "--max_steps", "4",
            "--learning_rate", "1e-3"],
           run, LaunchSpec(launcher="deepspeed", gpus_per_node=0, cpu_ranks=2, env={"QLLAVA_PLUGINS": env["QLLAVA_PLUGINS"]}),
           hang_timeout=300, echo=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["modality"] == "spectrum" and summary["world_size"] == 2 and summary["steps"] == 4
    _qllava("answer", "--model-path", run, "--question-file", recs / "eval_questions.jsonl", "--image-folder", media,
            "--answers-file", tmp_path / "answers.jsonl", "--max-new-tokens", "4", env=env)
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 10
    scores = json.loads(_qllava("metrics", "--gt", recs / "eval_gt.json", "--pred", tmp_path / "answers.jsonl", "--json", env=env))
    assert scores["n_closed"] == 10 and 0 <= scores["yes_no_accuracy"] <= 100
    assert not [p.name for p in Path(qllava.__file__).parent.glob("*.py") if "spectrum" in p.read_text()]
