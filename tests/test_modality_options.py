"""Per-modality settings of a run (issue 22): `--encoders` names the towers by modality, and preprocessing knobs such as
the aspect ratio are the modality's, given to its encoders at construction and kept in the checkpoint, so a model
trained with centre-cropped images is also asked with centre-cropped images after loading (before, every loaded
model padded, whatever it was trained on)."""
import pytest

from qllava.config import TrainConfig, parse_config, resolve_config
from qllava.core import ConfigError


def test_encoders_flag_is_json_by_modality_and_vision_tower_stays_its_one_encoder_spelling():
    from qllava.modeling.checkpoint import run_encoders
    cfg = parse_config(["--encoders", '{"sensor": "preset:tiny-limu"}', "--data_path", "x.json"])
    assert run_encoders(cfg) == {"sensor": "preset:tiny-limu"}
    assert run_encoders(parse_config(["--vision_tower", "preset:tiny-limu"])) == {"sensor": "preset:tiny-limu"}
    assert run_encoders(TrainConfig()) == {"image": "preset:tiny-clip"}
    with pytest.raises(SystemExit):
        parse_config(["--encoders", "preset:tiny-clip"])   # not a JSON object: argparse's usage error


def test_aspect_ratio_is_given_at_construction_and_survives_save_and_load(tmp_path):
    from qllava.modeling.checkpoint import load_base_model, load_model
    from qllava.data.modality import media_options
    cfg = resolve_config(TrainConfig(stage="pretrain"))            # the original stage 1: `square`, a centre crop
    assert media_options(cfg, ["image"]) == {"image": {"aspect_ratio": "crop"}}
    model, tok = load_base_model(cfg)
    assert model.encoders["image"].processor.aspect_ratio == "crop"
    model.save_pretrained(tmp_path / "ck", tokenizer=tok)
    again, _ = load_model(tmp_path / "ck")
    assert again.config.media_options == {"image": {"aspect_ratio": "crop"}}
    assert again.encoders["image"].processor.aspect_ratio == "crop"
    stage2, _ = load_base_model(resolve_config(TrainConfig(stage="finetune")))
    assert stage2.encoders["image"].processor.aspect_ratio == "pad"


def test_a_sensor_run_has_no_image_options_and_says_the_flag_does_nothing():
    from qllava.training.train import flag_notes
    cfg = resolve_config(TrainConfig(stage="pretrain", vision_tower="preset:tiny-limu"))
    assert any("--image_aspect_ratio square has no effect on the media of sensor" in n for n in flag_notes(cfg, 1))


def test_media_folders_are_per_modality_and_a_missing_one_is_named(tmp_path):
    from qllava.core import DataError
    from qllava.data.dataset import resolve_media_path
    from qllava.training.train import run_media_folders
    folders = {"image": tmp_path / "img", "sensor": tmp_path / "imu"}
    assert resolve_media_path("a.npy", folders, modality="sensor") == tmp_path / "imu" / "a.npy"
    with pytest.raises(DataError, match="no media folder is given for sensor media.*add sensor to --media_folders"):
        resolve_media_path("a.npy", {"image": tmp_path}, file="d.json", record=3, modality="sensor")
    cfg = TrainConfig(image_folder="all", media_folders={"sensor": "imu"})
    assert run_media_folders(cfg)["sensor"] == "imu" and run_media_folders(cfg)["image"] == "all"
    assert run_media_folders(TrainConfig(image_folder="all")) == "all"
