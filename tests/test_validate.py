"End-to-end tests of `qllava validate-data`: one test per kind of bad input, each naming the file and the record."
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qllava.core import ConfigError, DataError, set_offline
from qllava.training.validate import (KINDS, Problem, ValidationReport, validate_data, raise_if_invalid, show_labels,
                             TokenizeSettings, validate_data_cli, default_processors)

set_offline()
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sensor_shape():
    p = default_processors()["sensor"]
    return p.window, p.channels

@pytest.fixture
def media(tmp_path, sensor_shape):
    "A media folder with good and bad images and sensor windows."
    T, C = sensor_shape
    m = tmp_path / "media"; (m / "sub").mkdir(parents=True)
    Image.new("RGB", (48, 32), (180, 90, 140)).save(m / "ok.png")
    Image.new("L", (20, 20), 128).save(m / "sub" / "grey.png")
    (m / "corrupt.png").write_bytes((m / "ok.png").read_bytes()[:70])          # truncated PNG
    (m / "text.png").write_text("not an image at all")
    rng = np.random.default_rng(0)
    np.save(m / "ok.npy", rng.normal(size=(T, C)).astype(np.float32))
    a = rng.normal(size=(T, C)).astype(np.float32); a[3, 1] = np.nan
    np.save(m / "nan.npy", a)
    np.save(m / "shape.npy", rng.normal(size=(T, C + 1)).astype(np.float32))  # wrong channel count
    np.save(m / "flat.npy", rng.normal(size=(T * C,)).astype(np.float32))     # 1-D
    (tmp_path / "outside.png").write_bytes((m / "ok.png").read_bytes())
    return m

def rec(i, q="<image>\nWhat is shown?", a="Stained tissue.", **kw):
    return {"id": f"r{i}", **kw, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}

def good(i):
    return [rec(i, image="ok.png"), rec(i, q="<sensor>\nWhat is the activity?", a="Walking.", sensor="ok.npy"),
            rec(i, q="What does DAB stain?", a="Antibody binding sites."), rec(i, image="sub/grey.png")][i % 4]

def write(tmp_path, records, name="data.json"):
    f = tmp_path / name
    if name.endswith(".jsonl"): f.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    else: f.write_text(json.dumps(records, indent=1))
    return f

def dataset_with(tmp_path, bad_record, at=2, n=5, name="data.json"):
    "n good records with `bad_record` at index `at` (its id becomes r{at})."
    recs = [good(i) for i in range(n)]
    if isinstance(bad_record, dict) and "id" not in bad_record: bad_record = {"id": f"r{at}", **bad_record}
    recs[at] = bad_record
    return write(tmp_path, recs, name)

def check_one(f, media, kind, at=2, rid="r2", contains=(), **kw):
    "Validate; exactly one problem, of `kind`, at record `at`; its text names the file and the record; returns it."
    rep = validate_data(f, media, **kw)
    assert [(p.kind, p.record) for p in rep.problems] == [(kind, at)], rep.summary()
    p = rep.problems[0]
    where = f"{f}:{at}" + (f" (id {rid!r})" if rid is not None else "")
    assert str(p).startswith(where + ": "), str(p)
    assert p.fix and str(p).endswith("Fix: " + p.fix)
    for c in contains: assert c in p.message, p.message
    assert where in rep.summary()
    if p.severity == "error":
        assert not rep.ok and rep.bad_records == {at} and rep.n_ok == rep.n_records - 1
        with pytest.raises(DataError) as e: raise_if_invalid(rep)
        assert where in str(e.value) and "--skip_bad_records" in str(e.value) and "--skip-bad-records" not in str(e.value)
        assert raise_if_invalid(rep, skip_bad_records=True) == {at}
    return p


# ---------------------------------------------------------------- clean data
def test_clean_fixture(tmp_path, media):
    f = write(tmp_path, [good(i) for i in range(8)])
    rep = validate_data(f, media)
    assert rep.ok and rep.problems == [] and rep.n_records == 8 and rep.n_ok == 8, rep.summary()
    assert raise_if_invalid(rep) == set()
    assert "8 records, 8 ok" in rep.summary()

@pytest.mark.parametrize("modality", ["pathology", "imu"])
def test_shipped_demo_data_is_clean(modality):
    from qllava.training.validate import _demo_jobs
    jobs = _demo_jobs(modality)
    assert {t for _, _, t in jobs} == {"plain", "vicuna_v1"}
    for path, folder, template in jobs:
        rep = validate_data(path, folder, TokenizeSettings(template=template))
        assert rep.ok and rep.n_records > 0 and rep.n_warnings == 0, rep.summary()


# ---------------------------------------------------------------- the file itself
def test_broken_json_line_in_jsonl(tmp_path, media):
    lines = [json.dumps(good(0)), json.dumps(good(1)), '{"id": "r2", "conversations": [', "", json.dumps(good(3)),
             json.dumps({"id": "r4", "conversations": [{"from": "robot", "value": "hi"}]})]
    f = write(tmp_path, lines, "data.jsonl")
    rep = validate_data(f, media)
    # both problems are found: the scan does not stop at the broken line; indices are load_records' (blank lines skipped)
    assert [(p.kind, p.record) for p in rep.problems] == [("unreadable_json", 2), ("unknown_role", 4)], rep.summary()
    assert str(rep.problems[0]).startswith(f"{f}:2: ") and "line 3" in rep.problems[0].message
    assert rep.n_records == 5 and rep.bad_records == {2, 4}

def test_broken_record_in_json_list(tmp_path, media):
    body = ",\n".join([json.dumps(good(0)), '{"id": "r1", "conversations": oops}', json.dumps(good(2)), json.dumps(rec(3, image="gone.png"))])
    f = tmp_path / "data.json"; f.write_text("[\n" + body + "\n]\n")
    rep = validate_data(f, media)
    assert [(p.kind, p.record) for p in rep.problems] == [("unreadable_json", 1), ("media_missing", 3)], rep.summary()
    assert str(rep.problems[0]).startswith(f"{f}:1: ") and "line 3" in rep.problems[0].message
    assert raise_if_invalid(rep, skip_bad_records=True) == {1, 3}

def test_broken_json_list(tmp_path, media):
    f = tmp_path / "data.json"
    f.write_text("[\n" + json.dumps(good(0)) + "\n" + json.dumps(good(1)) + "\n]\n")   # missing comma between records
    rep = validate_data(f, media)
    assert [p.kind for p in rep.problems] == ["unreadable_json"] and rep.problems[0].record is None
    p = rep.problems[0]
    assert str(p).startswith(f"{f}: ") and "line 3, column 1" in p.message, str(p)
    assert not rep.ok and rep.file_error and rep.n_ok == 0
    with pytest.raises(DataError, match="cannot be read"): raise_if_invalid(rep, skip_bad_records=True)

def test_top_level_not_a_list(tmp_path, media):
    f = tmp_path / "data.json"; f.write_text('{"a": 1,\n "b": 2}')   # one object over two lines: neither a list nor JSONL
    rep = validate_data(f, media)
    assert [(p.kind, p.record) for p in rep.problems] == [("unreadable_json", 0), ("unreadable_json", 1)], rep.summary()

def test_list_of_non_objects(tmp_path, media):
    f = tmp_path / "data.json"; f.write_text('[{"id": "r0"}, 2, "three"]')
    rep = validate_data(f, media)
    assert [(p.kind, p.record) for p in rep.problems] == [("no_conversations", 0), ("not_object", 1), ("not_object", 2)]
    f.write_text('[1, 2]')
    rep = validate_data(f, media)
    assert [(p.kind, p.record) for p in rep.problems] == [("empty_file", None)] and "2 items but no record object" in rep.problems[0].message

@pytest.mark.parametrize("text", ["[]", "", "\n\n"])
def test_empty_file(tmp_path, media, text):
    f = tmp_path / "data.json"; f.write_text(text)
    rep = validate_data(f, media)
    assert [(p.kind, p.record) for p in rep.problems] == [("empty_file", None)] and not rep.ok
    assert str(rep.problems[0]).startswith(f"{f}: ") and rep.file_error

def test_record_not_an_object(tmp_path, media):
    check_one(dataset_with(tmp_path, ["human", "hi"]), media, "not_object", rid=None, contains=["list"])

def test_record_without_conversations(tmp_path, media):
    check_one(dataset_with(tmp_path, {"image": "ok.png"}), media, "no_conversations", contains=['"conversations"'])

def test_malformed_turn(tmp_path, media):
    r = rec(2); r["conversations"][1] = {"from": "gpt", "value": None}
    check_one(dataset_with(tmp_path, r), media, "bad_turn", contains=["turn 1"])


# ---------------------------------------------------------------- roles
def test_unknown_role(tmp_path, media):
    r = rec(2, image="ok.png"); r["conversations"][1]["from"] = "assistant"
    check_one(dataset_with(tmp_path, r), media, "unknown_role", contains=["turn 1", "'assistant'"])

def test_gpt_first(tmp_path, media):
    r = rec(2, image="ok.png"); r["conversations"] = r["conversations"][::-1]
    check_one(dataset_with(tmp_path, r), media, "not_human_first")

def test_roles_not_alternating(tmp_path, media):
    r = rec(2, image="ok.png"); r["conversations"].insert(1, {"from": "human", "value": "And?"})
    check_one(dataset_with(tmp_path, r), media, "not_alternating", contains=["turns 0 and 1"])

def test_unanswered_question(tmp_path, media):
    r = rec(2, image="ok.png"); r["conversations"].append({"from": "human", "value": "And?"})
    check_one(dataset_with(tmp_path, r), media, "unanswered_question")


# ---------------------------------------------------------------- placeholders against media keys
def test_placeholder_without_media_key(tmp_path, media):
    p = check_one(dataset_with(tmp_path, rec(2)), media, "media_count_mismatch", contains=['no "image" key'])
    assert '"image"' in p.fix

def test_media_key_without_placeholder(tmp_path, media):
    p = check_one(dataset_with(tmp_path, rec(2, q="What is shown?", image="ok.png")), media, "media_count_mismatch",
                  contains=["no <image> placeholder"])
    assert "<image>" in p.fix and "start of the first human turn" in p.fix

def test_sensor_key_without_placeholder(tmp_path, media):
    check_one(dataset_with(tmp_path, rec(2, q="What is the activity?", sensor="ok.npy")), media, "media_count_mismatch",
              contains=["no <sensor> placeholder"])

def test_two_placeholders_one_image(tmp_path, media):
    check_one(dataset_with(tmp_path, rec(2, q="<image>\n<image>\nCompare.", image="ok.png")), media, "media_count_mismatch",
              contains=["2 <image> placeholders for 1"])

def test_placeholder_in_answer(tmp_path, media):
    check_one(dataset_with(tmp_path, rec(2, a="Look: <image>", image="ok.png", q="<image>\nWhat?")), media,
              "placeholder_in_answer")

def test_bad_media_field(tmp_path, media):
    check_one(dataset_with(tmp_path, rec(2, image=17)), media, "bad_media_field")


# ---------------------------------------------------------------- media files
def test_corrupt_png(tmp_path, media):
    check_one(dataset_with(tmp_path, rec(2, image="corrupt.png")), media, "media_unreadable", contains=["corrupt.png", "truncated"])

def test_not_an_image(tmp_path, media):
    check_one(dataset_with(tmp_path, rec(2, image="text.png")), media, "media_unreadable", contains=["text.png"])

def test_missing_image(tmp_path, media):
    check_one(dataset_with(tmp_path, rec(2, image="gone.png")), media, "media_missing", contains=["gone.png", "does not exist"])

def test_missing_npy(tmp_path, media):
    check_one(dataset_with(tmp_path, rec(2, q="<sensor>\nActivity?", sensor="gone.npy")), media, "media_missing", contains=["gone.npy"])

def test_nan_in_npy(tmp_path, media):
    check_one(dataset_with(tmp_path, rec(2, q="<sensor>\nActivity?", sensor="nan.npy")), media, "media_unreadable",
              contains=["nan.npy", "NaN"])

@pytest.mark.parametrize("name", ["shape.npy", "flat.npy"])
def test_wrong_shape_npy(tmp_path, media, name):
    check_one(dataset_with(tmp_path, rec(2, q="<sensor>\nActivity?", sensor=name)), media, "media_unreadable", contains=[name])

def test_path_with_dotdot(tmp_path, media):
    check_one(dataset_with(tmp_path, rec(2, image="../outside.png")), media, "media_path_escapes",
              contains=["'../outside.png'", "outside the media folder"])

def test_dotdot_that_stays_inside_is_fine(tmp_path, media):
    rep = validate_data(dataset_with(tmp_path, rec(2, image="sub/../ok.png")), media)
    assert rep.ok, rep.summary()

def test_absolute_path(tmp_path, media):
    check_one(dataset_with(tmp_path, rec(2, image=str(media / "ok.png"))), media, "media_path_escapes", contains=["is absolute"])

def test_symlink_out_of_media_folder(tmp_path, media):
    (media / "link.png").symlink_to(tmp_path / "outside.png")
    check_one(dataset_with(tmp_path, rec(2, image="link.png")), media, "media_path_escapes", contains=["outside the media folder"])

def test_shared_bad_file_reported_for_every_record(tmp_path, media):
    f = write(tmp_path, [rec(i, image="corrupt.png") for i in range(3)] + [good(4)])
    rep = validate_data(f, media)
    assert [(p.kind, p.record) for p in rep.problems] == [("media_unreadable", i) for i in range(3)]

def test_check_media_off_still_checks_paths(tmp_path, media):
    f = write(tmp_path, [rec(0, image="corrupt.png"), rec(1, image="/abs.png")])
    rep = validate_data(f, media, check_media=False)
    assert [(p.kind, p.record) for p in rep.problems] == [("media_path_escapes", 1)]


# ---------------------------------------------------------------- answers and supervision
def test_empty_answer(tmp_path, media):
    check_one(dataset_with(tmp_path, rec(2, a="  ", image="ok.png")), media, "empty_answer", contains=["turn 1"])

def test_truncation_leaves_no_supervision(tmp_path, media):
    # the prompt fits max_length with a short media block, not with a long one: lengths count each placeholder
    # as its media tokens, and a sample whose answer is cut off entirely is an error (it would train on nothing)
    recs = [rec(i, q="Hi?", a="Yes.") for i in range(5)]
    recs[2] = rec(2, image="ok.png", q="<image>\nDescribe the staining of this tile in detail.")
    f = write(tmp_path, recs)
    assert validate_data(f, media, TokenizeSettings(max_length=96, n_media_tokens={"image": 4})).ok
    check_one(f, media, "no_supervision", settings=TokenizeSettings(max_length=96, n_media_tokens={"image": 80}),
              contains=["max_length 96", "<image> = 80 tokens"])

def test_truncated_but_supervised_is_a_warning(tmp_path, media):
    recs = [rec(i, q="Hi?", a="Yes.") for i in range(3)]
    recs[1] = rec(1, q="Hi?", a="Yes. " * 60)
    rep = validate_data(write(tmp_path, recs), media, TokenizeSettings(max_length=64))
    assert [(p.kind, p.record, p.severity) for p in rep.problems] == [("truncated", 1, "warning")]
    assert rep.ok

def test_duplicate_id_is_a_warning(tmp_path, media):
    recs = [good(i) for i in range(4)]; recs[3]["id"] = "r1"
    rep = validate_data(write(tmp_path, recs), media)
    assert [(p.kind, p.record, p.severity) for p in rep.problems] == [("duplicate_id", 3, "warning")]
    assert "also used by record 1" in rep.problems[0].message
    assert rep.ok and raise_if_invalid(rep) == set()

def test_record_without_id_is_a_warning_with_its_index(tmp_path, media, capsys):
    "A record with no id trains, but answers, reviews and skip lists cannot name it: the report says so, by index."
    recs = [good(i) for i in range(4)]; del recs[2]["id"]
    f = write(tmp_path, recs)
    rep = validate_data(f, media)
    assert [(p.kind, p.record, p.record_id, p.severity) for p in rep.problems] == [("missing_id", 2, None, "warning")]
    assert rep.ok and raise_if_invalid(rep) == set()
    assert f'{f}:2: the record has no "id". Fix: give every record a unique "id"' in rep.summary()
    assert rep.notes() == [f'warning: 1 of 4 records of {f} have no "id" (record 2). Fix: {KINDS["missing_id"][1]}']
    assert validate_data_cli([str(f), "--media-folder", str(media)]) == 0   # a warning: the check passes ...
    assert f'{f}:2: the record has no "id"' in capsys.readouterr().out      # ... and names the record

def test_truncated_records_are_counted_and_named_for_training(tmp_path, media, capsys):
    "What training logs and puts in its summary: how many records are cut at max_length, and the first of them."
    recs = [rec(i, q="Hi?", a="Yes.") for i in range(8)]
    for i in (1, 4, 6): recs[i] = rec(i, q="Hi?", a="Yes. " * 60)
    f = write(tmp_path, recs)
    rep = validate_data(f, media, TokenizeSettings(max_length=64))
    assert rep.truncation(2) == {"count": 3, "max_length": 64, "first_records": [1, 4], "first_ids": ["r1", "r4"]}
    assert rep.truncation()["first_ids"] == ["r1", "r4", "r6"]
    (note,) = rep.notes()
    assert note.startswith(f"warning: 3 of 8 records of {f} are longer than max_length and are cut to it "
                           "(record 1 (id 'r1'), 4 (id 'r4'), 6 (id 'r6')). Fix: raise --max-length"), note
    many = validate_data(write(tmp_path, [rec(i, q="Hi?", a="Yes. " * 60) for i in range(40)], "many.json"), media,
                         TokenizeSettings(max_length=64), max_problems=5)   # the count and the first records also past max_problems
    assert many.truncation()["count"] == 40 and many.truncation()["first_ids"] == ["r0", "r1", "r2", "r3", "r4"]
    assert validate_data_cli([str(f), "--media-folder", str(media), "--max-length", "64", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["truncation"] == {"count": 3, "max_length": 64, "first_records": [1, 4, 6], "first_ids": ["r1", "r4", "r6"]}
    assert d["notes"] == [note]

def test_plain_template_refuses_multi_turn(tmp_path, media):
    r = rec(2, image="ok.png"); r["conversations"] += [{"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]
    p = check_one(dataset_with(tmp_path, r), media, "bad_conversation", settings=TokenizeSettings(template="plain"), contains=["plain"])


# ---------------------------------------------------------------- the whole report
def test_collects_every_problem(tmp_path, media):
    bad = [rec(0, image="gone.png"), rec(1, image="corrupt.png"), rec(2, q="Hi?", a=""), rec(3, q="What?", image="ok.png"),
           rec(4), {"id": "r5"}, good(6), rec(7, image="../outside.png"), rec(8, q="<sensor>\nA?", sensor="nan.npy")]
    f = write(tmp_path, bad)
    rep = validate_data(f, media)
    assert rep.bad_records == {0, 1, 2, 3, 4, 5, 7, 8} and rep.n_ok == 1
    assert rep.counts == {"media_missing": 1, "media_unreadable": 2, "empty_answer": 1, "media_count_mismatch": 2,
                          "no_conversations": 1, "media_path_escapes": 1}
    assert [p.record for p in rep.problems] == sorted(p.record for p in rep.problems)  # file order
    df = rep.to_frame()
    assert list(df.columns) == ["file", "record", "record_id", "kind", "severity", "message", "fix"] and len(df) == 8
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["ok"] is False and d["n_records"] == 9 and len(d["problems"]) == 8

def test_many_problems_are_truncated_in_the_text(tmp_path, media):
    f = write(tmp_path, [rec(i, image=f"gone{i}.png") for i in range(2500)])
    rep = validate_data(f, media, max_problems=1000)
    assert rep.counts["media_missing"] == 2500 and len(rep.problems) == 1000 and rep.n_omitted == 1500
    assert len(rep.bad_records) == 2500  # every bad record is known even past max_problems
    s = rep.summary(max_per_kind=20)
    assert "... and 2480 more media_missing problems" in s and len(s.splitlines()) < 40

def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"): validate_data(tmp_path / "nope.json", tmp_path)


# ---------------------------------------------------------------- show_labels
def test_show_labels_marks_only_the_answer(tmp_path, media):
    recs = [rec(0, image="ok.png", q="<image>\nWhich stain is brown?", a="The DAB stain is brown."),
            {"id": "r1", "conversations": [{"from": "human", "value": "First question?"}, {"from": "gpt", "value": "First answer."},
                                          {"from": "human", "value": "Second question?"}, {"from": "gpt", "value": "Second answer."}]}]
    f = write(tmp_path, recs)
    txt = show_labels(f, 2, TokenizeSettings(n_media_tokens={"image": 7}), color=False)
    # the space before an answer belongs to its first token ("▁The"), which is supervised: shown as the model learns it
    sup = [seg.split("]]")[0].strip() for seg in txt.split("[[")[2:]]
    assert sup == ["The DAB stain is brown.</s>", "First answer.</s>", "Second answer.</s>"], txt
    assert "Which stain is brown?" in txt and "Second question?" in txt
    for human in ("Which stain", "First question", "Second question"):
        for seg in txt.split("[[")[1:]: assert human not in seg.split("]]")[0]
    assert "<image x7>" in txt and "<image>" not in txt.replace("<image x7>", "")
    assert f"{f}:0 (id 'r0')" in txt
    col = show_labels(f, 1, TokenizeSettings(n_media_tokens={"image": 7}), color=True)
    assert "\x1b[" in col and "[[" not in col

def test_show_labels_names_records_it_cannot_render(tmp_path, media):
    f = write(tmp_path, [json.dumps(good(0)), "{broken", json.dumps({"id": "r2", "conversations": [{"from": "bot", "value": "x"}]})], "d.jsonl")
    txt = show_labels(f, 3, color=False)
    assert f"{f}:1 ---\n(cannot render: the JSON line is unreadable)" in txt
    assert f"{f}:2 (id 'r2') ---\n(cannot render: turn 0 has the unknown role" in txt

def test_show_labels_plain_template(tmp_path, media):
    f = write(tmp_path, [rec(0, image="ok.png", q="<image>\nDescribe.", a="A brown tile.")])
    txt = show_labels(f, 1, TokenizeSettings(template="plain", n_media_tokens={"image": 5}), color=False)
    assert [seg.split("]]")[0].strip() for seg in txt.split("[[")[2:]] == ["A brown tile."], txt
    assert "Describe." not in txt and "<image x5>" in txt


# ---------------------------------------------------------------- CLI
def test_cli_exit_codes(tmp_path, media, capsys):
    ok = write(tmp_path, [good(i) for i in range(4)], "ok.json")
    bad = write(tmp_path, [good(0), rec(1, image="gone.png")], "bad.json")
    assert validate_data_cli([str(ok), "--media-folder", str(media)]) == 0
    assert validate_data_cli([str(bad), "--media-folder", str(media)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:1 (id 'r1')" in out and "media_missing" in out and "Fix:" in out
    assert validate_data_cli([str(bad), "--media-folder", str(media), "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["ok"] is False and d["problems"][0]["record"] == 1 and d["counts"] == {"media_missing": 1}
    assert validate_data_cli([str(ok), "--media-folder", str(media), "--template", "v1", "--max-length", "512",
                              "--n-media-tokens", "image=9", "--show-labels", "1"]) == 0
    out = capsys.readouterr().out
    assert "<image x9>" in out and "[[" in out and "template vicuna_v1" in out

def test_media_tokens_and_processors_come_from_the_encoder_registry(tmp_path, media, capsys):
    "The validator counts tokens as the towers do, cls_patch's CLS token included, for presets and any other encoder spec."
    from qllava.modeling.encoders import build_encoder
    f = write(tmp_path, [good(i) for i in range(4)])
    for feat in ("patch", "cls_patch"):
        want = {"image": build_encoder("preset:tiny-clip", select_feature=feat).num_tokens,
                "sensor": build_encoder("preset:tiny-limu", select_feature=feat).num_tokens}
        assert validate_data(f, media, TokenizeSettings(select_feature=feat)).settings["media_tokens"] == want
    assert want == {"image": 17, "sensor": 100}
    assert validate_data_cli([str(f), "--media-folder", str(media), "--select-feature", "cls_patch", "--image-preset", "bench-vit-b32",
                              "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["media_tokens"] == {"image": 50, "sensor": 100}
    assert validate_data(f, media, TokenizeSettings(encoders={"image": "hf-clip:" + str(ROOT / "tests/parity/llava_model/clip-vit-tiny")}),
                         check_media=False).settings["media_tokens"]["image"] == 16   # any encoder spec: 56 px, patch 14
    with pytest.raises(ConfigError, match="gives sensor features, not image ones"):
        validate_data(f, media, TokenizeSettings(encoders={"image": "tiny-limu"}))

def test_cli_demo(capsys):
    assert validate_data_cli(["--demo", "pathology", "--show-labels", "1"]) == 0
    out = capsys.readouterr().out
    assert "template plain" in out and "template vicuna_v1" in out and "2 of 2 files OK" in out

def test_cli_through_qllava_command(tmp_path, media):
    bad = write(tmp_path, [rec(0, q="What?", image="ok.png")], "bad.json")
    run = lambda *a: subprocess.run([sys.executable, "-c", "import sys; from qllava.cli import main; sys.exit(main(sys.argv[1:]))",
                                     "validate-data", *a], capture_output=True, text=True, env=set_offline(dict(os.environ)), timeout=300)
    r = run(str(bad), "--media-folder", str(media))
    assert r.returncode == 1 and f"{bad}:0 (id 'r0')" in r.stdout, r.stdout + r.stderr
    r = run(str(bad), "--template", "no-such-template")
    assert r.returncode == 2 and "unknown conversation template" in r.stderr
