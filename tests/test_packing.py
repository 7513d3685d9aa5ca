"""Packed training against unpacked training on the same samples (the demo's real images and IMU windows, a tiny
LLaMA in fp32): the same loss, gradients and weights after a few optimiser steps; no token sees another sample
(checked on transformers' own mask and by perturbing a neighbour); per-token logits equal to the unpacked ones."""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import pytest, torch
from qllava.core import DataError
from qllava.data.dataset import DataCollator, MultimodalDataset, load_records
from qllava.modeling.model import Placement, build_model
from qllava.data.packing import PackingCollator, batch_counts
from qllava.data.presets import demo_paths
from qllava.data.tokenize import IGNORE_INDEX

N = 10  # samples: one micro-batch


def demo_samples(model, tok, modality, n):
    d = demo_paths(modality)
    procs = {m: e.processor for m, e in model.encoders.items()}
    ds = MultimodalDataset(load_records(d["finetune"]), tok, "vicuna_v1", d["media_folder"], procs,
                           dict(model.config.encoder_num_tokens), 512)
    return [ds[i] for i in range(n)]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def setup(request):
    model, tok = build_model("preset:tiny-llama", {"image": "preset:tiny-clip", "sensor": "preset:tiny-limu"}, seed=0,
                             template="vicuna_v1", placement=Placement(attn_implementation=request.param))
    model.train()  # dropout is 0 in the presets: train mode changes nothing but the path taken
    samples = demo_samples(model, tok, "pathology", N - 3) + demo_samples(model, tok, "imu", 3)
    return model, tok, samples


def batches(tok, samples, budget=None):
    pad = tok.pad_token_id
    return DataCollator(pad)(samples), PackingCollator(pad, budget)(samples)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_samples_really_pack(setup):
    _, tok, samples = setup
    plain, packed = batches(tok, samples, budget=512)
    p, q = batch_counts(plain), batch_counts(packed)
    assert p["samples"] == q["samples"] == N and p["tokens"] == q["tokens"]
    assert q["rows"] < p["rows"] / 2 and q["computed"] < p["computed"]   # several samples per row, less padding
    assert "images" in packed and "sensors" in packed


@pytest.mark.parametrize("budget", [None, 512])
def test_packed_loss_and_gradients_equal_the_unpacked_ones(setup, budget):
    model, tok, samples = setup
    plain, packed = batches(tok, samples, budget)
    l0, g0 = loss_and_grads(model, plain)
    l1, g1 = loss_and_grads(model, packed)
    assert abs(l1 - l0) / abs(l0) <= 1e-5, (l0.item(), l1.item())
    assert g0.keys() == g1.keys() and len(g0) > 10
    a, b = torch.cat([g.flatten() for g in g0.values()]), torch.cat([g1[k].flatten() for k in g0])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.99999
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_packed_logits_equal_the_unpacked_ones_token_by_token(setup):
    model, tok, samples = setup
    plain, packed = batches(tok, samples, budget=512)
    with torch.no_grad():
        lp, lq = model(**plain).logits, model(**packed).logits
    real_p, real_q = plain["attention_mask"].bool(), packed["attention_mask"].bool()
    unpacked = {tuple(plain["input_ids"][i][real_p[i]].tolist()): lp[i][real_p[i]] for i in range(N)}
    seen = 0
    for r in range(len(real_q)):  # each sample of each packed row, found by its tokens among the unpacked rows
        n_real = int(real_q[r].sum())
        starts = (packed["position_ids"][r][:n_real] == 0).nonzero().flatten().tolist()
        for s, e in zip(starts, starts[1:] + [n_real]):
            same = unpacked[tuple(packed["input_ids"][r][s:e].tolist())]
            torch.testing.assert_close(lq[r][s:e], same, atol=2e-5, rtol=1e-4)
            seen += 1
    assert seen == N == len(unpacked)


def test_no_token_sees_another_sample(setup):
    "Changing one sample's tokens leaves every other sample's logits in its row exactly as they were."
    model, tok, samples = setup
    _, packed = batches(tok, samples, budget=512)
    row = max(range(len(packed["input_ids"])), key=lambda r: int((packed["position_ids"][r] == 0).sum()))
    starts = (packed["position_ids"][row] == 0).nonzero().flatten().tolist()
    first = slice(starts[0], starts[1])  # the row's first sample, changed; the rest of the row must not move
    changed = {k: v.clone() for k, v in packed.items()}
    text = changed["input_ids"][row, first] < model.config.text_config.vocab_size - 10  # not the media placeholders
    changed["input_ids"][row, first][text] = 7
    with torch.no_grad():
        a, b = model(**packed).logits[row], model(**changed).logits[row]
    assert not torch.equal(a[first], b[first])
    n_real = int(packed["attention_mask"][row].sum())
    torch.testing.assert_close(a[starts[1]:n_real], b[starts[1]:n_real], atol=0, rtol=0)


def test_transformers_builds_a_block_diagonal_mask_from_our_positions(setup):
    from transformers.masking_utils import create_causal_mask
    model, tok, samples = setup
    _, packed = batches(tok, samples, budget=512)
    pos = packed["position_ids"]
    emb = torch.zeros(*pos.shape, model.config.text_config.hidden_size)
    cfg = model.llm.config
    import inspect  # the cache argument's name: `cache` from transformers 5.25, `past_key_values` before
    no_cache = {"cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None}
    mask = create_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=None, position_ids=pos, **no_cache)
    if mask is None: pytest.skip("this transformers version builds no explicit mask for packed rows")
    seg = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)    # segment of each token
    allowed = (seg[:, :, None] == seg[:, None, :]) & torch.ones(pos.shape[1], pos.shape[1]).tril().bool()
    m = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    assert torch.equal(m, allowed)


def test_the_first_label_of_each_sample_is_never_predicted(setup):
    _, tok, samples = setup
    _, packed = batches(tok, samples, budget=512)
    assert (packed["labels"][packed["position_ids"] == 0] == IGNORE_INDEX).all()


def test_a_few_optimiser_steps_end_at_the_same_weights(setup):
    model, tok, samples = setup
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ends = []
    for packed in (False, True):
        model.load_state_dict(start)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for step in range(3):
            part = samples[step:] + samples[:step]
            batch = batches(tok, part, budget=512)[packed]
            opt.zero_grad(); model(**batch).loss.backward(); opt.step()
        ends.append({k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(start)
    for k in ends[0]:
        torch.testing.assert_close(ends[1][k], ends[0][k], atol=5e-5, rtol=1e-4, msg=k)


def test_a_sample_longer_than_the_budget_is_refused_naming_it(setup):
    _, tok, samples = setup
    with pytest.raises(DataError, match="more than the packing budget of 20") as e:
        PackingCollator(tok.pad_token_id, 20)(samples)
    assert "--packing_max_tokens" in str(e.value)


def test_packing_max_tokens_below_the_sample_length_is_refused_before_launch():
    from qllava.config import TrainConfig, resolve_config
    from qllava.core import ConfigError
    with pytest.raises(ConfigError, match="--packing_max_tokens 100 is below --model_max_length 2048"):
        resolve_config(TrainConfig(packing=True, packing_max_tokens=100))


def test_a_4_bit_base_with_lora_gives_the_same_loss_and_adapter_gradients_packed(tmp_path):
    "QLoRA's path: an NF4 (double-quantised) base from a folder, LoRA adapters; packed = unpacked."
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig
    base, tok = build_model("preset:tiny-llama", {"image": "preset:tiny-clip"}, seed=0, template="vicuna_v1")
    base.llm.save_pretrained(tmp_path / "llm"); tok.save_pretrained(tmp_path / "llm")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model, tok = build_model(str(tmp_path / "llm"), {"image": "preset:tiny-clip"}, seed=0, template="vicuna_v1",
                             placement=Placement(quantization_config=q))
    assert any(type(m).__name__ == "Linear4bit" for m in model.llm.modules())
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    samples = demo_samples(model, tok, "pathology", N)
    plain, packed = batches(tok, samples, budget=512)
    (l0, g0), (l1, g1) = loss_and_grads(model, plain), loss_and_grads(model, packed)
    assert abs(l1 - l0) / abs(l0) <= 1e-5, (l0.item(), l1.item())
    lora = [k for k in g0 if "lora_" in k]
    assert lora and g0.keys() == g1.keys()
    a, b = torch.cat([g0[k].flatten() for k in lora]), torch.cat([g1[k].flatten() for k in lora])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.99999
