"""`make-records` for a modality whose record key is not its name (issue 22's bug found by reading): the records name
each file under the modality's record key, so the converter's own split and VQA files find it, and a modality with no
caption instructions of its own gets generic ones instead of a KeyError."""
import json

import numpy as np
import pytest

from qllava.data.modality import MODALITIES, Modality, placeholder_re, record_media, register_modality


@pytest.fixture
def ecg():
    "A third modality registered as the ECG tutorial does (record key `ecg_file`), removed afterwards."
    from qllava.data.media import SensorProcessor
    m = register_modality(Modality("ecg", "<ecg>", record_key="ecg_file", batch_key="ecgs",
                                   make_processor=lambda s: SensorProcessor(s["window"], s["channels"]),
                                   input_shape=lambda s: (s["window"], s["channels"]), suffixes=(".ecg.npy",)))
    yield m
    MODALITIES.pop("ecg"); placeholder_re.cache_clear()


def _table(tmp_path, rows:int=10, qa:bool=True):
    (tmp_path / "ecg").mkdir()
    lines = ["ecg,question,answer" if qa else "ecg,caption"]
    for i in range(rows):
        np.save(tmp_path / "ecg" / f"{i}.ecg.npy", np.zeros((64, 1), np.float32))
        row = f"Is the rate fast?,{'yes' if i % 2 else 'no'}" if qa else "A calm rhythm."
        lines.append(f"{i}.ecg.npy,{row}")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "t.csv"


def test_make_records_names_the_file_under_the_record_key_and_splits_and_writes_vqa_files(tmp_path, ecg):
    from qllava.data.convert import make_records
    res = make_records(_table(tmp_path), tmp_path / "out", tmp_path / "ecg", modality="ecg", eval_fraction=0.3)
    recs = json.loads(res["data"].read_text())
    assert res["records"] == 7 and res["held_out_records"] == 3
    assert all(r["ecg_file"].endswith(".ecg.npy") and "ecg" not in r for r in recs)
    assert all(record_media(r, "ecg") for r in recs) and recs[0]["conversations"][0]["value"].startswith("<ecg>\n")
    qs = [json.loads(l) for l in res["questions"].read_text().splitlines()]
    held = {q["ecg_file"] for q in qs}
    assert len(held) == 3 and not held & {r["ecg_file"] for r in recs}   # held-out files are not trained on


def test_caption_records_of_a_new_modality_get_generic_instructions(tmp_path, ecg):
    from qllava.data.convert import make_records
    res = make_records(_table(tmp_path, 4, qa=False), tmp_path / "out", tmp_path / "ecg", modality="ecg")
    recs = json.loads(res["data"].read_text())
    assert res["data"].name == "pretrain.json" and len(recs) == 4
    firsts = [r["conversations"][0]["value"] for r in recs]
    assert all(v.startswith("<ecg>\n") and " ecg" in v for v in firsts)
