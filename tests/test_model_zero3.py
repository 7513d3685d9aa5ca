"""ZeRO-3 with mixed batches: on 2 CPU ranks (gloo) under DeepSpeed ZeRO-3 with every parameter partitioned, one rank
trains on an image batch while the other trains on a text-only batch, then the other way round. Every rank must gather
the same parameters in the same order; qllava runs the encoder + projector on a dummy input for the text-only batch.
(Without that dummy pass this same script dies with gloo's "distributed collective mismatch"; on NCCL it hangs.)"""
import json, os, subprocess, sys, socket
from pathlib import Path
import pytest

pytest.importorskip("deepspeed")

SCRIPT = r'''
import os, sys, json, torch
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import deepspeed, torch.distributed as dist
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
rank = dist.get_rank()
from qllava.modeling.model import build_model
torch.manual_seed(0)
model, tok = build_model(seed=0)
model.train()
cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2, "steps_per_print": 10**9,
       "zero_allow_untested_optimizer": True, "bf16": {"enabled": False},
       "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0,
                             "stage3_max_live_parameters": 0, "reduce_bucket_size": 1000}}
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
N, mid = model.config.encoder_num_tokens["image"], model.config.media_token_ids["image"]
shape = model.encoders["image"].input_shape
image_batch = dict(input_ids=torch.tensor([[1, 5] + [mid] * N + [6, 7]]), images=torch.randn(1, *shape))
text_batch = dict(input_ids=torch.tensor([[1, 8, 9, 10, 11]]))
losses = []
for step in range(2):  # rank 0: image then text; rank 1: text then image
    b = dict(image_batch if (rank + step) % 2 == 0 else text_batch)
    b["labels"] = b["input_ids"].masked_fill(b["input_ids"] == mid, -100)
    loss = engine(**b).loss
    engine.backward(loss); engine.step()
    losses.append(float(loss))
# one file per rank: two ranks printing to one stdout pipe can interleave their lines
open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w").write(json.dumps({"rank": rank, "losses": losses}))
'''


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def test_zero3_text_only_and_image_batches_on_different_ranks(tmp_path):
    f = tmp_path / "zero3_mixed.py"
    f.write_text(SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), str(f), str(tmp_path)]
    try: r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = lambda b: (b.decode() if isinstance(b, bytes) else b or "")[-2000:]
        pytest.fail(f"2-rank ZeRO-3 run did not finish in 240 s\nstdout: {out(e.stdout)}\nstderr: {out(e.stderr)}")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(x["rank"] for x in recs) == [0, 1]
    assert all(len(x["losses"]) == 2 and all(v == v for v in x["losses"]) for x in recs)
