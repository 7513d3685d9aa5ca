"""The original scripts' command lines run unchanged through `qllava train`'s parser.

`fixtures/original_scripts.json` holds the flag set of every training script of haotian-liu/LLaVA (v1.5 and the
legacy v1 scripts), aldraus/quilt-llava and BASHLab/LLaSA, read from those repositories at the recorded commits.
Each one, with its paths swapped for the demo's, must parse, resolve to the stage it describes and keep its
batch arithmetic; nothing is silently reinterpreted (no abbreviations), and `--help` explains every flag.
"""
import json, subprocess, sys
from pathlib import Path
import pytest

from qllava.core import ConfigError
from qllava.data.presets import demo_paths
from qllava.config import TrainConfig, config_parser, parse_config, resolve_config, resolve_batch
from qllava.training.train import deepspeed_config, flag_notes, step_schedule, train_cli

SCRIPTS = json.loads((Path(__file__).parent / "fixtures" / "original_scripts.json").read_text())["scripts"]
SHELL_VARS = {"$lr": "2e-4", "$mm_lr": "2e-5", "$epoch": "1", "$lora_r": "8", "$lora_alpha": "16",
              "$PROMPT_VERSION": "v1", "$MODEL_VERSION": "vicuna-7b", "$adapter_path": "ck", "$adapter_id": "0"}


def demo_argv(name, tmp_path):
    "The script's flags with data, models and output swapped for the demo's, and its shell variables filled in."
    sensor = "LLaSA" in name
    d = demo_paths("imu" if sensor else "pathology")
    swap = {"--data_path": str(d["finetune"]), "--image_folder": str(d["media_folder"]), "--output_dir": str(tmp_path / "out"),
            "--model_name_or_path": "preset:tiny-llama", "--vision_tower": "preset:tiny-limu" if sensor else "preset:tiny-clip",
            "--pretrain_mm_mlp_adapter": str(tmp_path / "mm_projector.bin")}
    argv = []
    for flag, value in SCRIPTS[name]["flags"]:
        if flag in swap: value = swap[flag]
        elif flag == "--deepspeed": value = Path(value).stem          # ./scripts/zero3.json -> our zero3 preset
        for var, v in SHELL_VARS.items(): value = value.replace(var, v)
        argv += [flag, value]
    return argv


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_original_script_parses_and_resolves(name, tmp_path):
    argv = demo_argv(name, tmp_path)
    cfg = resolve_config(parse_config(argv))
    given = dict(zip(argv[::2], argv[1::2]))
    # the stage the flags describe (the original scripts never pass --stage)
    want = ("pretrain" if given.get("--tune_mm_mlp_adapter") == "True" else
            ("qlora" if given.get("--bits") == "4" else "lora") if given.get("--lora_enable") == "True" else "finetune")
    assert cfg.stage == want
    # every value the script gives is the value the run uses
    for flag, value in given.items():
        field = flag[2:]
        got = getattr(cfg, field)
        if isinstance(got, bool): assert got == (value == "True"), flag
        elif isinstance(got, (int, float)) and not isinstance(got, bool): assert got == float(value), flag
        else: assert str(got) == value, flag
    # explicit per-device x accumulation is honoured over the preset's global batch, on any number of ranks
    for world in (1, 2, 8):
        pd, acc, g = resolve_batch(cfg.global_batch_size, world, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps)
        assert (pd, acc, g) == (int(given["--per_device_train_batch_size"]), int(given["--gradient_accumulation_steps"]),
                                int(given["--per_device_train_batch_size"]) * int(given["--gradient_accumulation_steps"]) * world)
    assert deepspeed_config(cfg.deepspeed, 1, 1, 1)["zero_optimization"]["stage"] in (2, 3)
    assert step_schedule(cfg, 10, 50)[0] == (10 if cfg.save_strategy == "epoch" else round(cfg.save_steps * 50) if cfg.save_steps < 1 else int(cfg.save_steps))


def test_script_batch_that_differs_from_the_published_one_says_so(tmp_path):
    cfg = resolve_config(parse_config(demo_argv("haotian-liu/LLaVA:scripts/v1_5/finetune.sh", tmp_path)))
    assert cfg.global_batch_size is None and cfg.per_device_train_batch_size == 16   # not the preset's 128
    pd, acc, g = resolve_batch(None, 2, 16, 1)
    notes = flag_notes(TrainConfig(**{**cfg.__dict__, "global_batch_size": g}), 2)
    assert any("global batch 32 (16 per device x 1 accumulation x 2 ranks) differs from the published 128" in n for n in notes)


def test_the_original_defaults_of_a_stage():
    "Stage 1 as the original scripts run it: no --image_aspect_ratio, so the original's `square` (centre crop)."
    assert resolve_config(TrainConfig(tune_mm_mlp_adapter=True)).image_aspect_ratio == "square"
    assert resolve_config(TrainConfig(stage="finetune")).image_aspect_ratio == "pad"
    assert resolve_config(TrainConfig(stage="finetune", per_device_train_batch_size=4, gradient_accumulation_steps=2)).global_batch_size is None
    assert resolve_config(TrainConfig(stage="finetune", per_device_train_batch_size=4)).global_batch_size == 128


def test_no_abbreviations_both_spellings_and_aliases():
    with pytest.raises(SystemExit): config_parser().parse_args(["--lr", "1e-3"])
    with pytest.raises(ConfigError, match="--lr"): parse_config(["--lr", "1e-3"])
    with pytest.raises(ConfigError, match="did you mean --learning_rate"): parse_config(["--learning_rat", "1e-3"])
    c = parse_config(["--per-device-train-batch-size", "4", "--eval_strategy", "epoch", "--save-steps", "0.5"])
    assert (c.per_device_train_batch_size, c.evaluation_strategy, c.save_steps) == (4, "epoch", 0.5)


def test_values_qllava_cannot_honour_are_refused_with_the_choices():
    for flag, value, msg in [("--mm_patch_merge_type", "spatial_unpad", "flat"), ("--optim", "adafactor", "adamw_torch"),
                             ("--report_to", "mlflow", "tensorboard"), ("--save_strategy", "best", "epoch"),
                             ("--stage", "sft", "unknown stage"), ("--image_aspect_ratio", "anyres", "pad")]:
        with pytest.raises(ConfigError, match=msg): resolve_config(parse_config([flag, value]))


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, "-m", "qllava.training.train", "--help"], capture_output=True, text=True, check=True).stdout
    flat = " ".join(out.split())
    for f in TrainConfig.__dataclass_fields__:
        assert f"--{f}" in flat
    assert "(default: the stage preset)" in flat and "(default: 'zero2')" in flat
    assert "peak learning rate" in flat and "--per-device-train-batch-size" in flat
    assert train_cli(["--help"]) == 0


def test_every_command_takes_both_spellings_and_no_abbreviations(capsys):
    "The original scripts write --image_folder, our docs --media-folder: either spelling works, for every command."
    from qllava.training.validate import validate_data_cli
    from qllava.evaluation.metrics import metrics_cli
    d = demo_paths("pathology")
    outs = []
    for spelling in ("--media-folder", "--media_folder"):
        assert validate_data_cli([str(d["pretrain"]), spelling, str(d["media_folder"]), "--template", "plain", "--max_length", "512"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0]
    with pytest.raises(SystemExit): metrics_cli(["--gt", str(d["eval_gt"]), "--pre", "x.jsonl"])  # --pre is not --pred
    assert "required: --pred" in capsys.readouterr().err
