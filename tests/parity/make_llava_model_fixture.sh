#!/usr/bin/env bash
# Regenerate tests/parity/llava_model/: the ORIGINAL LLaVA-1.5 code (haotian-liu/LLaVA, PyPI llava-torch 1.2.2.post1)
# builds a tiny seeded original-format checkpoint and runs its model_vqa inference path on two images; qllava's
# tests/test_import_llava_parity.py imports the checkpoint and compares prompt ids, pixels and logits with it.
#
#   bash tests/parity/make_llava_model_fixture.sh      # ~5 s once the venv exists; output is byte-identical run to run
#
# Same scratch venv and pinned stack as make_llava_fixture.sh (LLAVA_ORIG_VENV, default /tmp/llava-orig-venv, outside
# the repo); the script also needs numpy and safetensors, which transformers 4.37.2 already pulls in.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${LLAVA_ORIG_VENV:-/tmp/llava-orig-venv}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
case "$(realpath -m "$VENV")/" in
  "$REPO"/*) echo "LLAVA_ORIG_VENV=$VENV is inside the repo; put it outside (default /tmp/llava-orig-venv)" >&2; exit 2;;
esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q $TORCH_SPEC
"$VENV/bin/pip" install -q transformers==4.37.2 tokenizers==0.15.1 sentencepiece==0.1.99 protobuf pillow numpy safetensors
"$VENV/bin/pip" install -q --no-deps llava-torch==1.2.2.post1
"$VENV/bin/python" -c "import llava.model, llava.mm_utils, llava.conversation, llava.train.train"

cd "$REPO"
"$VENV/bin/python" tests/parity/make_llava_model_fixture.py --command "bash tests/parity/make_llava_model_fixture.sh${*:+ $*}" "$@"
