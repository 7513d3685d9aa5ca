"""qllava.modeling.model / qllava.modeling.generate on tiny models: the vectorised merge against a plain per-sample splice written here
(the way the original LLaVA code splices), the loss against the bare LLM, padding sides, gradient checkpointing,
ZeRO-3-safe text-only batches, and batched generation against one-at-a-time generation."""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import pytest, torch
from qllava.core import DataError
from qllava.modeling.model import build_model
from qllava.data.modality import MODALITIES
from qllava.modeling.generate import answer_batch, cut_at_stop, Decoding

IGNORE = -100


@pytest.fixture(scope="module")
def mm():
    "A tiny model with an image tower and an IMU tower, and its tokenizer."
    model, tok = build_model("preset:tiny-llama", {"image": "preset:tiny-clip", "sensor": "preset:tiny-limu"}, seed=0)
    return model, tok


def _media(model, modality, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, *model.encoders[modality].input_shape, generator=g)


def _samples(model, tok):
    """Unexpanded samples as the original code sees them: text pieces and media markers, with labels.
    Each sample: list of ("text", ids, supervised) / ("image"|"sensor", tensor) parts."""
    t = lambda s: tok(s, add_special_tokens=False).input_ids
    img, sen = lambda s: ("image", _media(model, "image", 1, s)[0]), lambda s: ("sensor", _media(model, "sensor", 1, s)[0])
    return [
        [("text", [tok.bos_token_id] + t("USER: hello there ASSISTANT:"), False), ("text", t(" hi, no media here"), True)],   # 0 media
        [("text", [tok.bos_token_id] + t("USER:"), False), img(1), ("text", t(" what is it? ASSISTANT:"), False), ("text", t(" tissue"), True)],  # 1 image
        [("text", [tok.bos_token_id], False), img(2), ("text", t(" and"), False), img(3), ("text", t(" compare ASSISTANT:"), False),
         ("text", t(" both brown"), True)],                                                                         # 2 images
        [("text", [tok.bos_token_id] + t("USER:"), False), sen(4), ("text", t(" activity? ASSISTANT:"), False), ("text", t(" walking"), True)],  # 1 sensor
        [("text", [tok.bos_token_id] + t("short"), True)],                                                        # text only
        [("text", [tok.bos_token_id], False), sen(5), img(6), ("text", t(" both kinds ASSISTANT:"), False), ("text", t(" yes"), True)],  # 2 media, mixed
    ]


def _collate_ours(model, samples, pad_id):
    "Our path: expanded placeholders (as qllava.data.tokenize makes them), right padding, media concatenated in order."
    ids_l, lab_l, media = [], [], {"image": [], "sensor": []}
    for s in samples:
        ids, labs = [], []
        for part in s:
            if part[0] == "text":
                ids += part[1]; labs += part[1] if part[2] else [IGNORE] * len(part[1])
            else:
                m = part[0]; n = model.config.encoder_num_tokens[m]
                ids += [model.config.media_token_ids[m]] * n; labs += [IGNORE] * n; media[m].append(part[1])
        ids_l.append(ids); lab_l.append(labs)
    L = max(map(len, ids_l))
    batch = {"input_ids": torch.tensor([x + [pad_id] * (L - len(x)) for x in ids_l]),
             "attention_mask": torch.tensor([[1] * len(x) + [0] * (L - len(x)) for x in ids_l]),
             "labels": torch.tensor([x + [IGNORE] * (L - len(x)) for x in lab_l])}
    for m, xs in media.items():
        if xs: batch[MODALITIES[m].batch_key] = torch.stack(xs)
    return batch


@torch.no_grad()
def _reference(model, samples):
    "Plain per-sample splice: embed text pieces, encode each medium alone, concatenate, right-pad."
    emb_layer = model.get_input_embeddings()
    embs, labels = [], []
    for s in samples:
        e, l = [], []
        for part in s:
            if part[0] == "text":
                e.append(emb_layer(torch.tensor(part[1]))); l += part[1] if part[2] else [IGNORE] * len(part[1])
            else:
                m, x = part
                f = model.projectors[m](model.encoders[m](x[None]))[0]  # (N, D)
                e.append(f); l += [IGNORE] * f.shape[0]
        embs.append(torch.cat(e)); labels.append(l)
    L, D = max(x.shape[0] for x in embs), embs[0].shape[1]
    out = torch.zeros(len(embs), L, D)
    mask = torch.zeros(len(embs), L, dtype=torch.long)
    lab = torch.full((len(embs), L), IGNORE)
    for i, (x, l) in enumerate(zip(embs, labels)):
        out[i, :len(x)], mask[i, :len(x)], lab[i, :len(x)] = x, 1, torch.tensor(l)
    return out, mask, lab


def test_merge_equals_per_sample_splice(mm):
    model, tok = mm
    samples = _samples(model, tok)
    batch = _collate_ours(model, samples, tok.pad_token_id)
    ref_emb, ref_mask, ref_lab = _reference(model, samples)
    with torch.no_grad():
        ours = model.embed(batch["input_ids"], {"image": batch["images"], "sensor": batch["sensors"]})
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["attention_mask"], ref_mask)
    assert torch.equal(batch["labels"], ref_lab)
    torch.testing.assert_close(ours[real], ref_emb[real], rtol=1e-5, atol=1e-6)
    # text-only sub-batch (no media keys at all) is plain token embeddings
    sub = _collate_ours(model, [samples[0], samples[4]], tok.pad_token_id)
    assert "images" not in sub and "sensors" not in sub
    r_emb, _, _ = _reference(model, [samples[0], samples[4]])
    with torch.no_grad(): o = model.embed(sub["input_ids"])
    torch.testing.assert_close(o[sub["attention_mask"].bool()], r_emb[sub["attention_mask"].bool()])


def test_loss_equals_bare_llm_on_merged_embeddings(mm):
    model, tok = mm
    samples = _samples(model, tok)
    batch = _collate_ours(model, samples, tok.pad_token_id)
    ref_emb, ref_mask, ref_lab = _reference(model, samples)
    with torch.no_grad():
        ours = model(**batch)
        bare = model.llm(inputs_embeds=ref_emb, attention_mask=ref_mask, labels=ref_lab)
    torch.testing.assert_close(ours.loss, bare.loss, rtol=1e-5, atol=1e-6)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours.logits[real], bare.logits[real], rtol=1e-4, atol=1e-5)


def test_mismatch_error_says_how_many(mm):
    model, tok = mm
    N = model.config.encoder_num_tokens["image"]
    ids = torch.tensor([[1] + [model.config.media_token_ids["image"]] * (2 * N) + [5]])
    with pytest.raises(DataError) as e:
        model(input_ids=ids, images=_media(model, "image", 1, 0))
    msg = str(e.value)
    assert f"{2 * N} <image> placeholder positions" in msg and f"1 image input(s) x {N} tokens each = {N} feature rows" in msg
    assert "Fix:" in msg
    with pytest.raises(DataError, match="0 image input"):  # placeholders but no images at all
        model(input_ids=ids)


def test_left_padding_positions(mm):
    "A left-padded row computes exactly what the unpadded row computes (positions counted from the first real token)."
    model, tok = mm
    N, mid = model.config.encoder_num_tokens["image"], model.config.media_token_ids["image"]
    row = [1, 40, 41] + [mid] * N + [42, 43]
    img = _media(model, "image", 1, 7)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([row]), images=img).logits[0]
        padded = model(input_ids=torch.tensor([[tok.pad_token_id] * 5 + row]),
                       attention_mask=torch.tensor([[0] * 5 + [1] * len(row)]), images=img).logits[0, 5:]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


def test_text_only_batch_runs_every_module_and_trains(mm):
    "ZeRO-3 safety: a text-only batch still passes through encoder + projector (zero contribution, zero gradient)."
    model, tok = mm
    model.train()
    try:
        batch = _collate_ours(model, [_samples(model, tok)[0]], tok.pad_token_id)
        calls = []
        hooks = [m.register_forward_hook(lambda *a, name=n: calls.append(name)) for n, m in
                 list(model.encoders.items()) + [(f"proj:{k}", v) for k, v in model.projectors.items()]]
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        for h in hooks: h.remove()
        assert set(calls) == {"image", "sensor", "proj:image", "proj:sensor"}
        for p in model.projectors.parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0
        with torch.no_grad(): bare = model.llm(**batch)
        torch.testing.assert_close(out.loss.detach(), bare.loss)
    finally:
        model.zero_grad(); model.eval()


def test_gradient_checkpointing_same_loss_and_grads(mm):
    model, tok = mm
    batch = _collate_ours(model, _samples(model, tok), tok.pad_token_id)
    def step():
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), model.projectors["image"][0].weight.grad.clone(), model.llm.lm_head.weight.grad.clone()
    model.train()
    try:
        a = step()
        model.activation_checkpointing_enable()
        assert model.is_activation_checkpointing and model.llm.is_activation_checkpointing
        b = step()
        model.activation_checkpointing_disable(); assert not model.is_activation_checkpointing
    finally:
        model.zero_grad(); model.eval()
    for x, y in zip(a, b): torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    assert a[1].abs().sum() > 0  # gradient reaches the projector through the merge


def test_attention_implementation_from_config(mm):
    model, _ = mm
    expected = "flash_attention_2" if torch.cuda.is_available() else "sdpa"
    try: import flash_attn  # noqa: F401
    except ImportError: expected = "sdpa"
    assert model.llm.config._attn_implementation == expected


PROMPTS = ["USER: <image>\nWhat is shown? ASSISTANT:", "USER: hi ASSISTANT:",
           "USER: <image>\nDescribe the tissue in the image in detail, please, with all the stains. ASSISTANT:",
           "USER: <sensor>\nWhat is the person doing? ASSISTANT:", "USER: yes or no? ASSISTANT:",
           "USER: <image>\n<image>\nCompare. ASSISTANT:", "USER: <sensor>\nactivity ASSISTANT:",
           "USER: a much longer text only question that goes on and on about many different things ASSISTANT:",
           "USER: <image>\nbrown? ASSISTANT:", "Q:"]


def _prompt_media(model):
    out = []
    for i, p in enumerate(PROMPTS):
        d = {}
        if p.count("<image>"): d["image"] = list(_media(model, "image", p.count("<image>"), 100 + i))
        if p.count("<sensor>"): d["sensor"] = list(_media(model, "sensor", 1, 200 + i))
        out.append(d or None)
    return out


def test_batched_greedy_equals_one_by_one(mm):
    model, tok = mm
    media = _prompt_media(model)
    dec = Decoding(max_new_tokens=12, stop_strings=[])
    batched = answer_batch(model, tok, PROMPTS, media, dec)
    alone = [answer_batch(model, tok, [p], [m], dec)[0] for p, m in zip(PROMPTS, media)]
    assert len(PROMPTS) >= 8 and len({len(tok(p).input_ids) for p in PROMPTS}) >= 8
    assert batched == alone
    assert sum(bool(a) for a in batched) >= 8  # real answers, not empty strings
    # batch size smaller than the number of prompts: same answers
    assert answer_batch(model, tok, PROMPTS, media, Decoding(max_new_tokens=12, stop_strings=[], batch_size=3)) == batched


def test_stop_strings_per_sequence(mm):
    "Stopping one sequence early on its stop string leaves the others' answers as they were."
    model, tok = mm
    media = _prompt_media(model)
    free = answer_batch(model, tok, PROMPTS, media, Decoding(max_new_tokens=12, stop_strings=[]))
    stop = next(a.split()[1] for a in free if len(a.split()) > 2)  # a word that occurs mid-answer somewhere
    stopped = answer_batch(model, tok, PROMPTS, media, Decoding(max_new_tokens=12, stop_strings=[stop]))
    for f, s in zip(free, stopped):
        assert s == cut_at_stop(f, [stop])
    assert any(stop in f for f in free) and any(stop not in f and f for f in free)


def test_sampling_and_beams_pass_through(mm):
    model, tok = mm
    media = _prompt_media(model)[:3]
    sample = Decoding(max_new_tokens=6, temperature=0.9, top_p=0.9)
    torch.manual_seed(0); a = answer_batch(model, tok, PROMPTS[:3], media, sample)
    torch.manual_seed(0); b = answer_batch(model, tok, PROMPTS[:3], media, sample)
    assert a == b and len(a) == 3
    beams = answer_batch(model, tok, PROMPTS[:3], media, Decoding(max_new_tokens=6, num_beams=3))
    assert len(beams) == 3 and all(isinstance(x, str) for x in beams)
