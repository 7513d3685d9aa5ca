"""Media loading, lazy records, the dataset, the collator and the modality/length-grouped sampler (qllava.data.media, qllava.data.dataset)."""
import json, os, time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qllava.core import DataError, ConfigError
from qllava.data.media import ImageProcessor, SensorProcessor, load_image, load_sensor, pad_to_square, CLIP_MEAN, CLIP_STD
from qllava.data.dataset import (load_records, Records, MultimodalDataset, DataCollator, ModalityLengthGroupedSampler,
                            media_files)

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------- media errors name the file

def _png(path, h=6, w=10, value=200):
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return path

def _bad_media(tmp_path):
    "(path, processor, expected message part) for every kind of bad media file."
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path/"full.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path/"full.png")
    (tmp_path/"cut.jpg").write_bytes((tmp_path/"full.jpg").read_bytes()[:600])
    (tmp_path/"cut.png").write_bytes((tmp_path/"full.png").read_bytes()[:2000])
    (tmp_path/"junk.png").write_bytes(b"GIF8 no image at all")
    (tmp_path/"folder.png").mkdir()
    w = rng.normal(size=(100, 6)).astype(np.float32)
    np.save(tmp_path/"chfirst.npy", w.T)
    np.save(tmp_path/"five.npy", w[:, :5])
    np.save(tmp_path/"three_d.npy", w[None])
    nan = w.copy(); nan[7, 1] = np.nan; np.save(tmp_path/"nan.npy", nan)
    inf = w.copy(); inf[2, 4] = -np.inf; np.save(tmp_path/"inf.npy", inf)
    np.save(tmp_path/"empty.npy", w[:0])
    np.save(tmp_path/"text.npy", np.array([["a"] * 6] * 3))
    (tmp_path/"garbage.npy").write_bytes(b"\x93NUMPY garbage")
    np.savez(tmp_path/"arch.npy", a=w); (tmp_path/"arch.npy.npz").rename(tmp_path/"arch.npy")
    ip, sp = ImageProcessor(16), SensorProcessor(100, 6)
    return [("missing.png", ip, "image file not found"), ("folder.png", ip, "not a file"),
            ("junk.png", ip, "not an image PIL can read"), ("cut.jpg", ip, "truncated"), ("cut.png", ip, "truncated"),
            ("missing.npy", sp, "sensor file not found"), ("garbage.npy", sp, "not a readable .npy"),
            ("arch.npy", sp, ".npz archive"), ("text.npy", sp, "non-numeric dtype"),
            ("chfirst.npy", sp, "looks channels-first"), ("five.npy", sp, "has 5 channels"),
            ("three_d.npy", sp, "must be 2-D"), ("nan.npy", sp, "1 NaN and 0 inf values (first at time 7, channel 1)"),
            ("inf.npy", sp, "0 NaN and 1 inf values (first at time 2, channel 4)"), ("empty.npy", sp, "no time steps")]

def test_media_errors_name_the_file(tmp_path):
    for name, proc, part in _bad_media(tmp_path):
        with pytest.raises(DataError) as e: proc(tmp_path/name)
        msg = str(e.value)
        assert msg.startswith(str(tmp_path/name) + ":"), msg
        assert part in msg and "Fix:" in msg, (name, msg)
    with pytest.raises(DataError, match="save the transpose"): SensorProcessor(100, 6)(tmp_path/"chfirst.npy")

def test_decompression_bomb_is_a_data_error(tmp_path, monkeypatch):
    _png(tmp_path/"big.png", 64, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)   # 4096 pixels > 2 x 100: PIL raises DecompressionBombError
    with pytest.raises(DataError, match=r"big\.png: PIL refused this image as a possible decompression bomb.*MAX_IMAGE_PIXELS"):
        load_image(tmp_path/"big.png")

def test_image_modes_become_rgb(tmp_path):
    Image.fromarray(np.zeros((4, 4, 4), np.uint8), "RGBA").save(tmp_path/"a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8), "L").convert("P").save(tmp_path/"p.png")
    Image.fromarray((np.arange(16).reshape(4, 4) * 4000).astype(np.uint16)).save(tmp_path/"g16.png")
    for f in ("a.png", "p.png", "g16.png"): assert load_image(tmp_path/f).mode == "RGB"
    assert np.asarray(load_image(tmp_path/"g16.png"))[3, 3, 0] == 255


# ---------------------------------------------------------------- pad to square with the mean colour

def test_pad_to_square_uses_the_mean_colour(tmp_path):
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.1)
    proc = ImageProcessor(20, mean=mean, std=std, aspect_ratio="pad")
    _png(tmp_path/"tall.png", h=20, w=8, value=255)
    sq = np.asarray(proc.prepare(tmp_path/"tall.png"))
    assert sq.shape == (20, 20, 3)
    assert (sq[:, :6] == (51, 102, 153)).all() and (sq[:, 14:] == (51, 102, 153)).all()   # 6 columns either side
    assert (sq[:, 6:14] == 255).all()
    x = proc(tmp_path/"tall.png")
    assert x.shape == (3, 20, 20) and x.dtype == torch.float32
    assert x[:, :, :5].abs().max() < 0.02                           # padding normalises to zero
    np.testing.assert_allclose(x[:, 10, 10], (1 - np.array(mean)) / np.array(std), atol=1e-4)
    # resize stretches instead: no padding anywhere
    y = ImageProcessor(20, mean=mean, std=std, aspect_ratio="resize")(tmp_path/"tall.png")
    np.testing.assert_allclose(y[:, :, 0], np.broadcast_to(((1 - np.array(mean)) / np.array(std))[:, None], (3, 20)), atol=1e-4)
    assert pad_to_square(Image.new("RGB", (5, 5)), (1, 2, 3)).size == (5, 5)

def test_image_processor_matches_clip_normalisation(tmp_path):
    _png(tmp_path/"sq.png", 32, 32, value=128)
    x = ImageProcessor(16)(tmp_path/"sq.png")
    np.testing.assert_allclose(x[:, 8, 8], (128/255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD), atol=1e-4)


# ---------------------------------------------------------------- sensor normalisation

def test_sensor_normalisation_and_window_policy(tmp_path):
    rng = np.random.default_rng(1)
    w = (rng.normal(size=(150, 6)) * [1, 2, 3, 4, 5, 6] + [10, -5, 0, 1, 2, 9.81]).astype(np.float32)
    w[:, 2] = 4.0                                                    # a constant channel
    np.save(tmp_path/"w.npy", w)
    z = SensorProcessor(150, 6)(tmp_path/"w.npy").numpy()          # per-window z-score
    keep = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(z[:, keep].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, keep].std(0), 1, atol=1e-4)
    assert np.abs(z[:, 2]).max() == 0
    mean, std = [10, -5, 4, 1, 2, 9.81], [1, 2, 1, 4, 5, 6]
    g = SensorProcessor(150, 6, mean=mean, std=std)(w).numpy()      # given statistics
    np.testing.assert_allclose(g, (w - np.array(mean, np.float32)) / np.array(std, np.float32), atol=1e-5)
    c = SensorProcessor(100, 6, mean=mean, std=std)(w).numpy()      # centre crop
    np.testing.assert_allclose(c, g[25:125], atol=1e-6)
    s = SensorProcessor(100, 6, mean=mean, std=std, crop="start")(w).numpy()
    np.testing.assert_allclose(s, g[:100], atol=1e-6)
    p = SensorProcessor(200, 6)(w).numpy()                           # pad after normalisation, with zeros
    np.testing.assert_allclose(p[:150], z, atol=1e-6); assert np.abs(p[150:]).max() == 0
    assert SensorProcessor(100, 6)([w, w[:80]]).shape == (2, 100, 6)
    with pytest.raises(ConfigError): SensorProcessor(100, 6, mean=[0] * 6)
    with pytest.raises(ConfigError): SensorProcessor(100, 6, mean=[0] * 6, std=[1, 1, 1, 1, 1, 0])
    assert load_sensor(tmp_path/"w.npy").dtype == np.float32


# ---------------------------------------------------------------- lazy records

def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ['tissue', 'the', 'brown', '"quoted"', 'back\\slash', '{brace}', '[bracket]', 'comma,', 'é', '中', '\\"', 'tab\t']
    out = []
    for i in range(n):
        txt = " ".join(rng.choice(words, int(rng.integers(2, 30))))
        r = {"id": f"r{i}", "conversations": [{"from": "human", "value": "<image>\nWhat is shown? " + txt[:15]},
                                              {"from": "gpt", "value": txt}]}
        if i % 3: r["image"] = f"img/{i}.png"
        out.append(r)
    return out

def test_lazy_index_of_100k_jsonl_and_json_list(tmp_path):
    recs = _records(100_000)
    with open(tmp_path/"big.jsonl", "w") as f:
        for r in recs: f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (tmp_path/"big.json").write_text(json.dumps(recs, indent=1, ensure_ascii=False))
    for name, limit in (("big.jsonl", 2.0), ("big.json", 6.0)):
        t = time.perf_counter(); r = load_records(tmp_path/name); dt = time.perf_counter() - t
        assert isinstance(r, Records) and r._items is None, "indexed by offsets, nothing parsed"
        assert len(r) == 100_000 and dt < limit, (name, dt)
        for i in (0, 1, 77_777, 99_999, -1): assert r[i] == recs[i]
        assert r._starts.nbytes + r._ends.nbytes == 1_600_000
    r = load_records(tmp_path/"big.json")
    assert list(r) == recs                                           # every object span is right (escapes, brackets in strings)

def test_records_edge_cases_and_errors(tmp_path):
    (tmp_path/"empty.json").write_text("")
    (tmp_path/"blank.jsonl").write_text("\n \n")
    (tmp_path/"dict.json").write_text('{"data": []}')
    (tmp_path/"obj.json").write_text('\n  {"data": [1,\n 2]}\n')
    (tmp_path/"list0.json").write_text(" [ ] ")
    (tmp_path/"bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"id": 1}]).encode())
    (tmp_path/"crlf.jsonl").write_bytes(b'{"id": 1}\r\n\r\n{"id": 2}\r\n')
    (tmp_path/"broken.jsonl").write_text('{"id": 1}\n\n{"id": 2, "conversations": [}\n')
    (tmp_path/"broken.json").write_text('[\n{"id": 1},\n{"id": 2, "x": tru}\n]')
    (tmp_path/"latin.jsonl").write_bytes(b'{"id": "\xe9"}\n')
    (tmp_path/"nested.json").write_text('[{"id": 1}, [2]]')
    assert len(load_records(tmp_path/"list0.json")) == 0
    assert load_records(tmp_path/"bom.json")[0] == {"id": 1}
    assert [x["id"] for x in load_records(tmp_path/"crlf.jsonl")] == [1, 2]
    with pytest.raises(DataError, match="empty.json: the data file is empty"): load_records(tmp_path/"empty.json")
    with pytest.raises(DataError, match="blank.jsonl: the data file holds only blanks"): load_records(tmp_path/"blank.jsonl")
    assert list(load_records(tmp_path/"dict.json")) == [{"data": []}]   # not a list: read as JSONL (as validate-data does)
    with pytest.raises(DataError, match="obj.json, record 0: the record is not valid JSON"): load_records(tmp_path/"obj.json")[0]
    with pytest.raises(DataError, match=r"broken.jsonl, record 1: the record is not valid JSON \(.* at line 3, column"):
        load_records(tmp_path/"broken.jsonl")[1]
    r = load_records(tmp_path/"broken.json")                         # still indexed: the damage is inside record 1
    assert r[0] == {"id": 1}
    with pytest.raises(DataError, match=r"broken.json, record 1: the record is not valid JSON \(.* at line 3, column"): r[1]
    with pytest.raises(DataError, match="latin.jsonl, record 0: the record is not valid JSON"): load_records(tmp_path/"latin.jsonl")[0]
    with pytest.raises(DataError, match="nested.json, record 1: the record is a JSON list, not an object"): load_records(tmp_path/"nested.json")[1]
    with pytest.raises(IndexError): load_records(tmp_path/"bom.json")[1]

def test_records_survive_pickling_and_fork(tmp_path):
    import pickle
    (tmp_path/"d.jsonl").write_text("\n".join(json.dumps({"id": i}) for i in range(10)))
    r = load_records(tmp_path/"d.jsonl"); r[0]
    assert r._fd is not None
    r2 = pickle.loads(pickle.dumps(r))                               # spawn-style workers get a copy without the descriptor
    assert r2._fd is None and r2[9] == {"id": 9}
    import multiprocessing as mp                                     # fork-style workers reopen the file in the child
    ctx = mp.get_context("fork"); q = ctx.Queue()
    p = ctx.Process(target=lambda: q.put((r[5], r._pid == os.getpid()))); p.start(); p.join(30)
    assert q.get(timeout=5) == ({"id": 5}, True)


# ---------------------------------------------------------------- sampler

def _lens(n_img, n_txt, n_sen=0, seed=0):
    rng = np.random.default_rng(seed)
    lens = [int(x) for x in rng.integers(10, 500, n_img)] + [-int(x) for x in rng.integers(10, 500, n_txt)] \
         + [int(x) for x in rng.integers(10, 500, n_sen)]
    mods = ["image"] * n_img + ["text"] * n_txt + ["sensor"] * n_sen
    return lens, mods

def _epoch(lens, bs, R, mods=None, seed=0, epoch=0, **kw):
    out = []
    for r in range(R):
        s = ModalityLengthGroupedSampler(lens, bs, num_replicas=R, rank=r, seed=seed, modalities=mods, **kw)
        s.set_epoch(epoch); out.append(list(s))
    return out

@pytest.mark.parametrize("R", [2, 3])
@pytest.mark.parametrize("sizes", [(96, 48, 0), (101, 37, 13), (7, 3, 2)])
def test_sampler_covers_every_sample_once_and_is_modality_pure(R, sizes):
    lens, mods = _lens(*sizes)
    per_rank = _epoch(lens, 4, R, mods)
    assert len({len(b) for b in per_rank}) == 1                       # same number of steps on every rank
    seen = sorted(i for batches in per_rank for b in batches for i in b)
    n_pad = ModalityLengthGroupedSampler(lens, 4, R, 0, modalities=mods).n_padded
    assert n_pad == (1 if (sizes, R) == ((7, 3, 2), 3) else 0)       # only a group smaller than the number of ranks pads
    if n_pad == 0: assert seen == list(range(len(lens))), "every sample exactly once per epoch over all ranks"
    else: assert sorted(set(seen)) == list(range(len(lens))) and len(seen) == len(lens) + n_pad
    for step in zip(*per_rank):                                      # one modality per step, on all ranks
        assert len({mods[i] for b in step for i in b}) == 1
        assert all(1 <= len(b) <= 4 for b in step)
    assert len(per_rank[0]) == len(ModalityLengthGroupedSampler(lens, 4, R, 0, modalities=mods))

def test_sampler_default_sign_grouping_like_llava():
    lens, _ = _lens(50, 30)
    per_rank = _epoch(lens, 4, 2)
    for step in zip(*per_rank): assert len({lens[i] > 0 for b in step for i in b}) == 1

def test_sampler_groups_by_length():
    lens, mods = _lens(2000, 1000)
    batches = _epoch(lens, 8, 2, mods)[0]
    spread = np.mean([np.ptp(np.abs([lens[i] for i in b])) for b in batches])
    rng = np.random.default_rng(0); perm = rng.permutation(len(lens))
    random_spread = np.mean([np.ptp(np.abs([lens[i] for i in perm[k:k+8]])) for k in range(0, len(lens), 8)])
    assert spread < random_spread / 5, (spread, random_spread)
    first = batches[0] + _epoch(lens, 8, 2, mods)[1][0]
    assert max(abs(lens[i]) for i in first) == max(map(abs, lens))   # the longest step comes first (OOM shows early)

def test_sampler_ranks_differ_and_order_is_deterministic_per_seed_and_epoch():
    lens, mods = _lens(64, 32)
    a = _epoch(lens, 4, 2, mods)
    assert a[0] != a[1] and not set(i for b in a[0] for i in b) & set(i for b in a[1] for i in b)
    assert _epoch(lens, 4, 2, mods) == a
    assert _epoch(lens, 4, 2, mods, epoch=1) != a
    assert _epoch(lens, 4, 2, mods, seed=1) != a

def test_sampler_single_modality_and_group_by_modality_off():
    for lens in ([5] * 13, [-5] * 13):                                # only media / only text: LLaVA's sampler asserts here
        per_rank = _epoch(lens, 3, 2)
        assert sorted(i for b in per_rank[0] + per_rank[1] for i in b) == list(range(13))
    lens, mods = _lens(10, 10)
    per_rank = _epoch(lens, 4, 2, mods, group_by_modality=False)
    assert sorted(i for b in per_rank[0] + per_rank[1] for i in b) == list(range(20))

def test_sampler_pads_only_when_it_must():
    # a group smaller than the number of ranks: repeated from the same group, counted
    lens, mods = _lens(20, 2)
    s = [ModalityLengthGroupedSampler(lens, 4, 3, r, modalities=mods) for r in range(3)]
    assert s[0].n_padded == 1
    allb = [b for x in s for b in list(x)]
    seen = [i for b in allb for i in b]
    assert sorted(set(seen)) == list(range(22)) and len(seen) == 23
    for step in zip(*[list(x) for x in s]): assert len({mods[i] for b in step for i in b}) == 1
    # batch size 1 with an odd group on 2 ranks
    assert ModalityLengthGroupedSampler([3] * 5, 1, 2, 0).n_padded == 1
    assert ModalityLengthGroupedSampler([3] * 5, 2, 2, 0).n_padded == 0

def test_sampler_resume_reproduces_the_remaining_order():
    lens, mods = _lens(90, 41, 17)
    for rank in (0, 1, 2):
        full = ModalityLengthGroupedSampler(lens, 4, 3, rank, seed=7, modalities=mods); full.set_epoch(2)
        expected = list(full)
        run = ModalityLengthGroupedSampler(lens, 4, 3, rank, seed=7, modalities=mods); run.set_epoch(2)
        it = iter(run); head = [next(it) for _ in range(5)]
        state = json.loads(json.dumps(run.state_dict()))              # survives a JSON checkpoint
        assert state["epoch"] == 2 and state["position"] == 5
        again = ModalityLengthGroupedSampler(lens, 4, 3, rank, seed=7, modalities=mods)
        again.load_state_dict(state); again.set_epoch(2)               # the loop's set_epoch of the same epoch keeps the position
        assert head + list(again) == expected
        again.set_epoch(3)                                             # the next epoch starts from its beginning
        nxt = ModalityLengthGroupedSampler(lens, 4, 3, rank, seed=7, modalities=mods); nxt.set_epoch(3)
        assert list(again) == list(nxt)
    # `consumed` overrides the iterator's count (a prefetching DataLoader runs ahead)
    s = ModalityLengthGroupedSampler(lens, 4, 3, 0, modalities=mods); it = iter(s); [next(it) for _ in range(6)]
    assert s.state_dict(consumed=4)["position"] == 4
    with pytest.raises(ConfigError, match="num_replicas: saved 3, now 2"):
        ModalityLengthGroupedSampler(lens, 4, 2, 0, modalities=mods).load_state_dict(s.state_dict())

def test_sampler_arguments_and_torch_distributed_default(tmp_path):
    with pytest.raises(ConfigError): ModalityLengthGroupedSampler([1, 2], 2, num_replicas=2, rank=2)
    with pytest.raises(ConfigError): ModalityLengthGroupedSampler([], 2, 1, 0)
    s = ModalityLengthGroupedSampler([1, 2, 3], 2)
    assert (s.num_replicas, s.rank) == (1, 0)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path/'pg'}", rank=0, world_size=1)
    try:
        s = ModalityLengthGroupedSampler([1, 2, 3], 2)
        assert (s.num_replicas, s.rank) == (1, 0)
    finally: dist.destroy_process_group()


def _dist_rank(rank, world, init, lens, mods, q):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        s = ModalityLengthGroupedSampler(lens, 4, seed=5, modalities=mods)       # rank and world from torch.distributed
        q.put((rank, s.num_replicas, s.rank, list(s)))
    finally: dist.destroy_process_group()

def test_sampler_shards_under_torch_distributed(tmp_path):
    import multiprocessing as mp
    lens, mods = _lens(40, 20, 12)
    ctx = mp.get_context("fork"); q = ctx.Queue()
    procs = [ctx.Process(target=_dist_rank, args=(r, 2, f"file://{tmp_path/'pg2'}", lens, mods, q)) for r in range(2)]
    for p in procs: p.start()
    got = sorted(q.get(timeout=60) for _ in procs)
    for p in procs: p.join(30)
    assert [(g[1], g[2]) for g in got] == [(2, 0), (2, 1)]
    assert got[0][3] == _epoch(lens, 4, 2, mods, seed=5)[0] and got[1][3] == _epoch(lens, 4, 2, mods, seed=5)[1]
    assert sorted(i for g in got for b in g[3] for i in b) == list(range(72))


# ---------------------------------------------------------------- collator

def test_collator_shapes_and_padding():
    samples = [{"input_ids": torch.tensor([1, 2, 3, 4]), "labels": torch.tensor([-100, -100, 3, 4]),
                "images": torch.full((1, 3, 8, 8), 1.), "sensors": None},
               {"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([-100, 6]), "images": None,
                "sensors": torch.full((2, 10, 6), 2.)},
               {"input_ids": torch.tensor([7, 8, 9]), "labels": torch.tensor([7, 8, 9]),
                "images": torch.full((2, 3, 8, 8), 3.), "sensors": torch.full((1, 10, 6), 4.)}]
    b = DataCollator(pad_token_id=0)(samples)
    assert set(b) == {"input_ids", "attention_mask", "labels", "images", "sensors"}
    assert b["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 0, 0], [7, 8, 9, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert b["labels"].tolist() == [[-100, -100, 3, 4], [-100, 6, -100, -100], [7, 8, 9, -100]]
    assert b["images"].shape == (3, 3, 8, 8) and b["images"][:, 0, 0, 0].tolist() == [1, 3, 3]
    assert b["sensors"].shape == (3, 10, 6) and b["sensors"][:, 0, 0].tolist() == [2, 2, 4]
    assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long
    t = DataCollator(0)([samples[1]])
    assert "images" not in t and t["sensors"].shape == (2, 10, 6)
    assert DataCollator(0, pad_to_multiple_of=8)(samples)["labels"].shape == (3, 8)
    with pytest.raises(ConfigError): DataCollator(None)


# ---------------------------------------------------------------- dataset end to end

@pytest.fixture(scope="module")
def tok():
    from qllava.data.presets import load_tokenizer
    from qllava.data.tokenize import prepare_tokenizer
    return prepare_tokenizer(load_tokenizer("llama-demo"))

def _tiny_set(root):
    (root/"media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(4): Image.fromarray(rng.integers(0, 255, (12 + 4*k, 20, 3), dtype=np.uint8)).save(root/f"media/t{k}.png")
    for k in range(2): np.save(root/f"media/s{k}.npy", rng.normal(size=(90 + 20*k, 6)).astype(np.float32))
    H, G = "human", "gpt"
    recs = [{"id": "img0", "image": "t0.png", "conversations": [{"from": H, "value": "<image>\nWhat stain dominates?"}, {"from": G, "value": "Brown DAB stain."}]},
            {"id": "txt0", "conversations": [{"from": H, "value": "What is haematoxylin?"}, {"from": G, "value": "A blue nuclear stain."}]},
            {"id": "img1", "image": "t1.png", "conversations": [{"from": H, "value": "Describe.\n<image>"}, {"from": G, "value": "Dense nuclei."},
                                                              {"from": H, "value": "Any brown?"}, {"from": G, "value": "Yes."}]},
            {"id": "txt1", "conversations": [{"from": H, "value": "Say hi."}, {"from": G, "value": "Hi."}]},
            {"id": "img2", "image": ["t2.png", "t3.png"], "conversations": [{"from": H, "value": "<image><image> Same tissue?"}, {"from": G, "value": "No."}]},
            {"id": "sen0", "sensor": "s0.npy", "conversations": [{"from": H, "value": "<sensor>\nWhat activity?"}, {"from": G, "value": "Walking."}]},
            {"id": "sen1", "sensor": "s1.npy", "conversations": [{"from": H, "value": "<sensor>\nActivity?"}, {"from": G, "value": "Standing."}]}]
    (root/"train.json").write_text(json.dumps(recs, indent=2))
    return recs

def _ds(root, tok, **kw):
    args = dict(records=root/"train.json", tokenizer=tok, template="vicuna_v1", media_folder=root/"media",
                processors={"image": ImageProcessor(32), "sensor": SensorProcessor(100, 6)},
                n_media_tokens={"image": 5, "sensor": 7}, max_length=512)
    return MultimodalDataset(**{**args, **kw})

def test_dataset_end_to_end(tmp_path, tok):
    recs = _tiny_set(tmp_path)
    ds = _ds(tmp_path, tok)
    assert len(ds) == 7
    assert ds.modalities == ["image", "text", "image", "text", "image", "sensor", "sensor"]
    assert [l > 0 for l in ds.modality_lengths] == [True, False, True, False, True, True, True]
    img_id, sen_id = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<sensor>")
    for i, r in enumerate(recs):
        x = ds[i]
        assert x["input_ids"].dtype == torch.long and x["input_ids"].shape == x["labels"].shape
        n_img = len(media_files(r).get("image", [])); n_sen = len(media_files(r).get("sensor", []))
        assert int((x["input_ids"] == img_id).sum()) == 5 * n_img and int((x["input_ids"] == sen_id).sum()) == 7 * n_sen
        assert (x["labels"][x["input_ids"] == img_id] == -100).all()
        assert (x["images"] is None) == (n_img == 0) and (x["sensors"] is None) == (n_sen == 0)
        if n_img: assert x["images"].shape == (n_img, 3, 32, 32)
        if n_sen: assert x["sensors"].shape == (n_sen, 100, 6)
        sup = tok.decode(x["labels"][x["labels"] != -100]).replace(" ", "")
        answers = "".join(t["value"] + "</s>" for t in r["conversations"] if t["from"] == "gpt").replace(" ", "")
        assert sup == answers, (sup, answers)
    # estimated lengths follow the real ones
    real = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    rel = np.abs(np.array(ds.lengths) - real) / np.array(real)
    assert rel.mean() < 0.1 and rel.max() < 0.2, (real, ds.lengths)
    # collate a batch the sampler made, through a DataLoader with worker processes
    s = ModalityLengthGroupedSampler(ds.lengths, 2, num_replicas=1, rank=0, modalities=ds.modalities)
    dl = torch.utils.data.DataLoader(ds, batch_sampler=s, collate_fn=ds.collator(), num_workers=2)
    seen = 0
    for b in dl:
        B, L = b["input_ids"].shape
        assert b["attention_mask"].shape == (B, L) and b["labels"].shape == (B, L)
        assert ("images" in b) + ("sensors" in b) <= 1                # modality-pure batches
        if "images" in b: assert b["images"].shape[0] == int((b["input_ids"] == img_id).sum()) // 5
        if "sensors" in b: assert b["sensors"].shape[0] == int((b["input_ids"] == sen_id).sum()) // 7
        seen += B
    assert seen == 7

def test_dataset_errors_name_file_record_and_id(tmp_path, tok):
    recs = _tiny_set(tmp_path)
    bad = recs + [{**recs[0], "id": "gone", "image": "nope.png"},
                  {**recs[0], "id": "escape", "image": "../train.json"},
                  {**recs[0], "id": "count", "image": ["t0.png", "t1.png"]},
                  {**recs[5], "id": "sensT", "sensor": "sT.npy"}]
    np.save(tmp_path/"media/sT.npy", np.zeros((6, 100), np.float32))
    (tmp_path/"train.json").write_text(json.dumps(bad))
    ds = _ds(tmp_path, tok)
    assert len(ds.lengths) == 11 and ds.modalities[7:] == ["image", "image", "image", "sensor"]   # no media file opened
    for i, part in ((7, "nope.png, record 7, id 'gone': image file not found"), (8, "record 8, id 'escape': the media path '../train.json' leads outside"),
                    (9, "record 9, id 'count': the conversation has 1 image placeholder(s) for 2"),
                    (10, "sT.npy, record 10, id 'sensT': the array has shape (6, 100), which looks channels-first")):
        with pytest.raises(DataError) as e: ds[i]
        assert part in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="no sensor processor"): _ds(tmp_path, tok, processors={"image": ImageProcessor(32)})[5]
    with pytest.raises(ConfigError, match="prepare_tokenizer"):
        from qllava.data.presets import load_tokenizer
        _ds(tmp_path, load_tokenizer("llama-demo"))

def test_dataset_skip_mode_counts_and_stays_modality_pure(tmp_path, tok):
    recs = _tiny_set(tmp_path)
    long_q = {"id": "long", "image": "t0.png", "conversations": [{"from": "human", "value": "<image>\n" + "word " * 300}, {"from": "gpt", "value": "Short."}]}
    data = recs + [{**recs[0], "id": "gone", "image": "nope.png"}, long_q]
    (tmp_path/"train.jsonl").write_text("\n".join(json.dumps(r) for r in data) + "\n{broken\n")
    ds = _ds(tmp_path, tok, records=tmp_path/"train.jsonl", max_length=64)
    with pytest.raises(DataError, match="record 8, id 'long': no supervised token left after truncation to max_length=64"): ds[8]
    with pytest.raises(DataError, match=r"train.jsonl, record 9: the record is not valid JSON"): ds.lengths
    ds = _ds(tmp_path, tok, records=tmp_path/"train.jsonl", max_length=64, on_error="skip")
    assert len(ds.lengths) == 10 and ds.modalities[9] == "text"
    got = [ds[i] for i in range(len(ds))]
    assert got[7]["images"] is not None and got[8]["images"] is not None    # replaced by image samples
    assert got[9]["images"] is None
    assert ds.report() == {"n": 10, "skipped": 2, "dropped": 1}
    assert set(ds.skipped) == {7, 9} and set(ds.dropped) == {8}


DEMO = Path(__file__).resolve().parents[1] / "qllava" / "assets" / "demo"

@pytest.mark.parametrize("modality", ["pathology", "imu"])
def test_shipped_demo_data_loads(modality, tok):
    from qllava.data.presets import demo_paths, get_preset
    p = demo_paths(modality)
    if not p["finetune"].exists(): pytest.skip(f"demo data not built yet ({p['finetune']} missing; `qllava make-demo`)")
    enc = get_preset("tiny-clip" if modality == "pathology" else "tiny-limu")
    pre = enc["preprocessing"]
    procs = {"image": ImageProcessor(pre["image_size"], tuple(pre["mean"]), tuple(pre["std"]))} if modality == "pathology" \
        else {"sensor": SensorProcessor(pre["window"], pre["channels"], pre.get("mean"), pre.get("std"))}
    n_tok = {"image": (enc["config"]["image_size"] // enc["config"]["patch_size"]) ** 2} if modality == "pathology" \
        else {"sensor": enc["config"]["seq_len"]}
    for split in ("pretrain", "finetune"):
        ds = MultimodalDataset(p[split], tok, "plain" if split == "pretrain" else "vicuna_v1", p["media_folder"], procs, n_tok, max_length=512)
        lengths = ds.lengths
        s = ModalityLengthGroupedSampler(lengths, 4, num_replicas=2, rank=0, modalities=ds.modalities)
        batch = ds.collator()([ds[i] for i in next(iter(s))])
        assert batch["input_ids"].shape[0] >= 1 and (batch["labels"] != -100).any()
        real = [len(ds[i]["input_ids"]) for i in range(min(len(ds), 40))]
        rel = np.abs(np.array(lengths[:len(real)]) - real) / np.array(real)
        assert rel.mean() < 0.15, (real, lengths[:len(real)])


@pytest.mark.timeout(600)
def test_record_without_id_is_named_in_the_training_log(tmp_path):
    "qllava.training.train under deepspeed (2 CPU ranks) on records of which two have no id: the launch log says so once, by index."
    from qllava.cluster.launch import LaunchSpec, launch
    (tmp_path / "img").mkdir()
    recs = []
    for i in range(8):
        _png(tmp_path / "img" / f"{i}.png", 16, 16, 30 * i)
        r = {"id": f"q{i}", "image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nIs it dark?"},
                                                                   {"from": "gpt", "value": "Yes" if i < 4 else "No"}]}
        if i in (1, 6): del r["id"]
        recs.append(r)
    (tmp_path / "ft.json").write_text(json.dumps(recs))
    out = tmp_path / "out"
    launch(["-m", "qllava.training.train", "--stage", "finetune", "--data_path", str(tmp_path / "ft.json"), "--image_folder", str(tmp_path / "img"),
            "--output_dir", str(out), "--model_max_length", "96", "--global_batch_size", "4", "--num_train_epochs", "1"],
           out, LaunchSpec(launcher="deepspeed", gpus_per_node=0, cpu_ranks=2), hang_timeout=300, echo=False)
    log = (out / "launch.log").read_text()
    line = f'2 of 8 records of {tmp_path / "ft.json"} have no "id" (record 1, 6)'
    assert log.count(line) == 1, log[-3000:]   # rank 0 only
    assert (out / "summary.json").is_file()     # and training went on: a warning, not an error
