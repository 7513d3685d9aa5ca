#!/usr/bin/env bash
# Regenerate tests/parity/llava_next_fixture.json.gz: the ORIGINAL LLaVA-NeXT code (LLaVA-VL/LLaVA-NeXT at commit
# df179663, llava/train/train.py: preprocess_llama3, preprocess_qwen) tokenises our records; qllava's tests compare
# their input_ids / labels with it.
#
#   bash tests/parity/make_llava_next_fixture.sh                       # default tokenizer folders (/tmp/hubtok/...)
#   bash tests/parity/make_llava_next_fixture.sh --llama3 DIR --qwen2 DIR   # arguments go to the .py
#
# LLaVA-NeXT is not on PyPI: llava/ and trl/ of the commit are exported (git archive, unmodified) from a git mirror
# (LLAVA_NEXT_GIT, default /work/.mirror/LLaVA-VL+LLaVA-NeXT/repo; cloned from GitHub when that does not exist) into
# the scratch venv and put on PYTHONPATH. The venv (LLAVA_NEXT_VENV, default /tmp/llava-next-venv) is OUTSIDE the repo;
# nothing of it touches the project's own .venv. Needs network access to PyPI only (when the mirror exists).
#
# Stack: LLaVA-NeXT's pyproject pins transformers at git commit 1c39974a (4.40.0.dev0, also requirements.txt) and
# tokenizers~=0.15.2; the closest PyPI release that takes tokenizers 0.15 is transformers 4.39.3 (4.40.0 needs
# tokenizers 0.19). `import llava.train.train` needs, besides torch/transformers/Pillow: deepspeed (imported at module
# level; 0.14.4 as pinned, CPU accelerator), einops (the model classes, else llava/__init__ fails), datasets 2.16.1 and
# tyro (the vendored trl/ imported by llava_trainer.py), accelerate, pyyaml, requests. av / decord / open_clip are
# try-imported by the original and left out (video / OpenCLIP towers only). No stub module anywhere.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${LLAVA_NEXT_VENV:-/tmp/llava-next-venv}"
PY="${PYTHON:-python3}"
GIT_DIR_NEXT="${LLAVA_NEXT_GIT:-/work/.mirror/LLaVA-VL+LLaVA-NeXT/repo}"
COMMIT="${LLAVA_NEXT_COMMIT:-df179663ae8b83207df100a1f7af24caec633ff9}"
# torch as the LLaVA-1.5 fixture takes it: the CPU build from the local wheel folder pip is configured with
# (find-links); elsewhere set TORCH_SPEC (e.g. to a CPU wheel) to avoid a CUDA download.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
case "$(realpath -m "$VENV")/" in
  "$REPO"/*) echo "LLAVA_NEXT_VENV=$VENV is inside the repo; put it outside (default /tmp/llava-next-venv)" >&2
             exit 2;;
esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q $TORCH_SPEC
"$VENV/bin/pip" install -q transformers==4.39.3 tokenizers==0.15.2 accelerate einops datasets==2.16.1 tyro \
  numpy pillow pyyaml requests
# deepspeed's setup.py imports torch: build it against the venv's torch (no C++ op is compiled at install)
"$VENV/bin/pip" install -q --no-build-isolation deepspeed==0.14.4

SRC="$VENV/llava-next-src"
if [ "$(cat "$SRC/COMMIT" 2>/dev/null)" != "$COMMIT" ]; then
  rm -rf "$SRC" && mkdir -p "$SRC"
  if [ ! -d "$GIT_DIR_NEXT" ]; then
    GIT_DIR_NEXT="$VENV/llava-next.git"
    [ -d "$GIT_DIR_NEXT" ] || git clone -q --bare https://github.com/LLaVA-VL/LLaVA-NeXT "$GIT_DIR_NEXT"
  fi
  git --git-dir="$GIT_DIR_NEXT" archive "$COMMIT" llava trl | tar -x -C "$SRC"
  echo "$COMMIT" > "$SRC/COMMIT"
fi
export PYTHONPATH="$SRC"
"$VENV/bin/python" -c "import llava.train.train, llava.conversation" >/dev/null  # fails here if a dep is missing

cd "$REPO"
TEXTS="$VENV/encoded_texts.json"
"$VENV/bin/python" tests/parity/make_llava_next_fixture.py \
  --command "bash tests/parity/make_llava_next_fixture.sh${*:+ $*}" --texts-out "$TEXTS" "$@"
# Sanity check: every text the original encoded, re-encoded by the project's transformers 5 from the shipped
# tokenizer.json (result recorded in the fixture's source.text_check; a difference is reported, not fatal).
if [ -x "$REPO/.venv/bin/python" ]; then
  env -u PYTHONPATH "$REPO/.venv/bin/python" tests/parity/make_llava_next_fixture.py --check-texts "$TEXTS" "$@" || true
fi
