# The two jobs a newcomer runs (README): `make run` and `make test`. Each sets itself up on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torchvision (needed by open_clip) must match torch; override for another platform or CUDA build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup vocab run test test-min nbtest pytest export clean-nbs assets bench docs

$(BIN)/.installed: setup.py settings.ini
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[train,dev]'
	# DeepSpeed's CPU communication op, compiled once here: otherwise every launch JIT-compiles it (minutes, under a lock).
	# --no-cache-dir: pip would otherwise reuse a cached deepspeed wheel built earlier without the op.
	DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(BIN)/pip install -q --no-cache-dir --no-build-isolation --no-deps --force-reinstall \
	    --no-binary deepspeed "deepspeed==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
	$(BIN)/python -c 'import deepspeed.ops.comm.deepspeed_shm_comm_op' || { echo "DeepSpeed was installed without its CPU comm op"; exit 1; }
	touch $@

setup: $(BIN)/.installed

# The real tokenizers of current backbones (Llama-3.1, Qwen2.5, Qwen3, Phi-3.5) for the tests, built once into
# ~/.cache/qllava/vocab (QLLAVA_VOCAB_DIR) from llama.cpp's vocabularies in llama-cpp-python's sdist (pip, the registry).
vocab: setup
	$(BIN)/python -m qllava.cli make-vocab

# The main job on the embedded default: stage 2 (stage 1 first when needed) through the deepspeed launcher.
run: setup
	mkdir -p runs
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/papermill --log-output nbs/train.ipynb runs/out.ipynb -p stage finetune

# The whole test suite: notebooks are the source, so first check the package is what they export.
test: setup vocab
	$(BIN)/nbdev_export && git diff --exit-code --stat -- qllava
	# the run notebooks (train / eval / sweep) launch real jobs: pytest runs them through papermill instead
	$(BIN)/nbdev_test --n_workers 2 --do_print --skip_file_re '^(train|eval|sweep)\.ipynb$$' --skip_folder_re '^([_.]|tutorials$$)'
	# the tutorials, as nbdev_test runs them, their outputs kept in _proc/executed/ for the docs site (make docs)
	$(BIN)/python tools/run_tutorials.py
	$(BIN)/pytest -q tests

# The lower bounds of settings.ini (constraints-min.txt) under the tests that use those libraries: installed without
# their dependencies into .venv-min, which sees the project's venv for everything else (no multi-GB download).
MIN_TESTS := tests/test_tokenize.py tests/test_tokenizer_roundtrip.py tests/test_model.py tests/test_checkpoint.py \
	tests/test_old_checkpoint.py tests/test_export_answers.py tests/test_answer.py tests/test_serve.py tests/test_review.py \
	tests/test_bench.py tests/test_packing.py
test-min: setup
	rm -rf .venv-min && $(BIN)/python -m venv --without-pip .venv-min
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > \
	    "$$(.venv-min/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_project_venv.pth"
	$(BIN)/pip --python .venv-min/bin/python install -q --no-deps -r constraints-min.txt
	PYTHONPATH=$(CURDIR) .venv-min/bin/python -m pytest -q -p no:cacheprovider $(MIN_TESTS)

# The documentation site, offline, into _docs/ (open _docs/index.html): nbdev's notebook processing, one page per
# notebook; only what the API docs need runs (exported cells, imports, show_doc), never an example or a run notebook.
# Tutorials and run notebooks show the outputs `make test` kept in _proc/executed/ (run it first to have them).
docs: setup
	$(BIN)/python tools/build_docs.py --out _docs

export: setup
	$(BIN)/nbdev_export

clean-nbs: setup
	$(BIN)/nbdev_clean

# Rebuild the shipped tokenizers and demo data from their PyPI-packaged sources.
assets: setup
	$(BIN)/qllava make-demo

bench: setup
	$(BIN)/python bench/run_all.py
