"""The LLaSA path end to end: `papermill nbs/train.ipynb OUT -p modality sensor` on the embedded IMU demo (LIMU-BERT
tower, BasicMotions windows) through the real DeepSpeed launcher with 2 CPU ranks, nothing mocked.

Stage 1 on the sensor captions, stage 2 on the sensor questions and answers, then the held-out activity questions
answered greedily: the model trained and asked with its IMU windows must name the right activity clearly more often
than the same recipe trained and asked with every window blanked (4 activities: chance is 25 %).
"""
import json, os, time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(1200)
ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def test_sensor_train_notebook_learns_activities_from_the_imu_windows(tmp_path, keep_for_docs):
    # the acceptance command itself: the demo profile's 120 IMU epochs (30 epochs once gave 47.5 % vs 25 %,
    # too close to chance to be a reliable test; 120 gave 97.5 % on 2026-12-04)
    import papermill as pm
    t0 = time.time()
    pm.execute_notebook(str(ROOT / "nbs" / "train.ipynb"), str(tmp_path / "imu.ipynb"),
                        parameters={"modality": "sensor", "runs_dir": str(tmp_path / "runs")}, progress_bar=False, cwd=str(tmp_path))
    seconds = time.time() - t0
    run = json.loads((tmp_path / "runs" / "finetune-sensor" / "run.json").read_text())
    assert [s["name"] for s in run["stages"]] == ["pretrain", "finetune", "finetune (media blanked)"]
    assert all(s["config"]["vision_tower"] == "preset:tiny-limu" for s in run["stages"])
    m = run["metrics"]
    assert m["n_open"] == 40  # the activity questions (descriptions are left to the judge)
    acc, ctl = m["open_accuracy"], m["control_open_accuracy"]
    print(f"IMU held-out activity accuracy: with the sensor {acc} %, sensor blanked {ctl} % ({seconds:.0f} s)")
    assert acc >= ctl + 20 and acc >= 50, (acc, ctl)
    nb = json.loads((tmp_path / "imu.ipynb").read_text())
    outs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    text = "".join("".join(o.get("text", "")) for o in outs)
    assert f"with media {m['closed_accuracy']} %" in text  # both numbers printed
    html = "".join("".join(o.get("data", {}).get("text/html", "")) for o in outs)
    assert "media blanked (control)" in html and str(acc) in html and str(ctl) in html
    assert any("image/png" in o.get("data", {}) for o in outs)  # the six-channel plots and the loss curves
    shown = "".join("".join(o.get("text", "")) for o in outs if o.get("output_type") == "stream")
    for noise in ("Warning", "WARNING", "built successfully", "Setting accelerator"):  # in the launch log, not here
        assert noise not in shown, noise
    keep_for_docs(tmp_path / "imu.ipynb", "run-train.ipynb")
