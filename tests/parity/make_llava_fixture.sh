#!/usr/bin/env bash
# Regenerate tests/parity/llava_fixture.json.gz: the ORIGINAL LLaVA-1.5 code (haotian-liu/LLaVA, released on PyPI as
# llava-torch 1.2.2.post1) tokenises our records; qllava's tests compare their input_ids / labels with it.
#
#   bash tests/parity/make_llava_fixture.sh            # both tokenizers, all templates
#   bash tests/parity/make_llava_fixture.sh --tokenizers llama-demo   # extra arguments go to make_llava_fixture.py
#
# The original's pinned stack goes into a scratch venv OUTSIDE the repo (LLAVA_ORIG_VENV, default
# /tmp/llava-orig-venv); nothing of it touches the project's own .venv. Needs network access to PyPI only.
#
# What `import llava.train.train` needs (found by importing it): torch, transformers (+ its own deps), Pillow
# (llava/conversation.py, mm_utils.py and train.py import PIL at module level). llava/__init__.py imports the model
# classes and llava/train/llava_trainer.py imports transformers.Trainer; both import with just these. deepspeed, peft,
# bitsandbytes and flash-attn are imported only inside train() or by train_mem.py, which the fixture never calls, so
# llava-torch is installed with --no-deps (its declared deps pin torch 2.1.2, deepspeed, gradio, ...) and imported as is.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${LLAVA_ORIG_VENV:-/tmp/llava-orig-venv}"
PY="${PYTHON:-python3}"
# torch==2.13.0 as asked: on the project's machines pip takes the CPU build from the local wheel folder that pip is
# configured with (find-links); elsewhere set TORCH_SPEC (e.g. to a CPU wheel) to avoid a CUDA download.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
case "$(realpath -m "$VENV")/" in
  "$REPO"/*) echo "LLAVA_ORIG_VENV=$VENV is inside the repo; put it outside (default /tmp/llava-orig-venv)" >&2; exit 2;;
esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q $TORCH_SPEC
"$VENV/bin/pip" install -q transformers==4.37.2 tokenizers==0.15.1 sentencepiece==0.1.99 protobuf pillow
"$VENV/bin/pip" install -q --no-deps llava-torch==1.2.2.post1
"$VENV/bin/python" -c "import llava.train.train, llava.mm_utils, llava.conversation"  # fails here if a dep is missing

cd "$REPO"
"$VENV/bin/python" tests/parity/make_llava_fixture.py --command "bash tests/parity/make_llava_fixture.sh${*:+ $*}" "$@"
