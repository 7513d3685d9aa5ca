"""`import qllava` is fast and light: heavy libraries load only when a feature needs them."""
import json, subprocess, sys, time


def _run(code):
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out, time.perf_counter() - t0


def test_import_qllava_is_fast_and_imports_no_heavy_library():
    code = "import sys, json, time; t=time.perf_counter(); import qllava; dt=time.perf_counter()-t; " \
           "print(json.dumps({'dt': dt, 'mods': sorted(m for m in ('deepspeed', 'open_clip', 'torch', 'transformers', 'peft') if m in sys.modules)}))"
    out, _ = _run(code)
    r = json.loads(out)
    assert r["mods"] == [], r["mods"]
    assert r["dt"] < 2.0, f"import qllava took {r['dt']:.2f} s"


def test_cli_help_and_light_modules_do_not_import_torch():
    code = "import sys, json; import qllava.core, qllava.data.conversation, qllava.cli; " \
           "print(json.dumps(sorted(m for m in ('torch', 'deepspeed', 'open_clip', 'transformers') if m in sys.modules)))"
    out, _ = _run(code)
    assert json.loads(out) == []
    r = subprocess.run([sys.executable, "-m", "qllava.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "validate-data" in r.stdout


def test_model_modules_do_not_import_deepspeed_or_open_clip():
    code = "import sys, json; import qllava.modeling.model, qllava.modeling.encoders, qllava.data.dataset, qllava.training.train, qllava.cluster.launch; " \
           "print(json.dumps(sorted(m for m in ('deepspeed', 'open_clip') if m in sys.modules)))"
    out, _ = _run(code)
    assert json.loads(out) == []
