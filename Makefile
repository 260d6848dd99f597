# The two commands of README.md:
#   make demo   set up, train the demo on the built-in Shapes data, print ShapesEval scores
#   make test   set up, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: setup demo demo-mixture tokenizers maskgit show-o mmada fudoki harmon x-omni seed-llama smartedit early-fusion janus transfusion-vae moe mot mmdit metaquery faults soak test bench-gpu clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e ".[test]"
	# byte-compile on every core (pip compiles on one; imports need the .pyc files when
	# PYTHONDONTWRITEBYTECODE is set)
	-$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m unimm.train --config configs/demo.py --workdir $(WORKDIR)

# The demo on Shapes mixed with data converted from public formats (configs/demo_mixture.py).
demo-mixture: setup
	rm -rf runs/data/pairs runs/data/edits
	$(PY) -m unimm.data.fixtures --format img2dataset --output runs/data/raw_pairs/00000.parquet --n 2000
	$(PY) -m unimm.data.convert --format img2dataset --input runs/data/raw_pairs --output runs/data/pairs
	$(PY) -m unimm.data.fixtures --format instructpix2pix --output runs/data/raw_edits/00000.parquet --n 2000
	$(PY) -m unimm.data.convert --format instructpix2pix --input runs/data/raw_edits --output runs/data/edits
	$(PY) -m unimm.train --config configs/demo_mixture.py --workdir runs/demo_mixture

# Image tokenizers on Shapes, and the recipes built on them (configs/*.py say what each is).
runs/vae_shapes/eval.json: | setup
	$(PY) -m unimm.train.autoencoder --config configs/vae_shapes.py --workdir runs/vae_shapes

runs/vq_shapes/eval.json: | setup
	$(PY) -m unimm.train.autoencoder --config configs/vq_shapes.py --workdir runs/vq_shapes

tokenizers: runs/vae_shapes/eval.json runs/vq_shapes/eval.json

maskgit: runs/vq_shapes/eval.json
	$(PY) -m unimm.train --config configs/maskgit_shapes.py --workdir runs/maskgit

show-o: runs/vq_shapes/eval.json
	$(PY) -m unimm.train --config configs/show_o_shapes.py --workdir runs/show_o

mmada: runs/vq_shapes/eval.json
	$(PY) -m unimm.train --config configs/mmada_shapes.py --workdir runs/mmada

fudoki: runs/vq_shapes/eval.json
	$(PY) -m unimm.train --config configs/fudoki_shapes.py --workdir runs/fudoki

runs/x_omni_decoder/eval.json: runs/vq_shapes/eval.json
	$(PY) -m unimm.train --config configs/x_omni_decoder_shapes.py --workdir runs/x_omni_decoder

x-omni: runs/x_omni_decoder/eval.json
	$(PY) -m unimm.train --config configs/x_omni_shapes.py --workdir runs/x_omni
	$(PY) -m unimm.train.grpo --init runs/x_omni --workdir runs/x_omni_grpo

runs/seed_tokenizer/eval.json: | setup
	$(PY) -m unimm.train --config configs/seed_tokenizer_shapes.py --workdir runs/seed_tokenizer

seed-llama: runs/seed_tokenizer/eval.json
	$(PY) -m unimm.train --config configs/seed_llama_shapes.py --workdir runs/seed_llama

harmon: setup
	$(PY) -m unimm.train --config configs/harmon_shapes.py --workdir runs/harmon

early-fusion: runs/vq_shapes/eval.json
	$(PY) -m unimm.train --config configs/early_fusion_shapes.py --workdir runs/early_fusion

janus: runs/vq_shapes/eval.json
	$(PY) -m unimm.train --config configs/janus_shapes.py --workdir runs/janus

transfusion-vae: runs/vae_shapes/eval.json
	$(PY) -m unimm.train --config configs/transfusion_vae.py --workdir runs/transfusion_vae

moe: setup
	$(PY) -m unimm.train --config configs/moe_unified.py --workdir runs/moe_unified

mot: setup
	$(PY) -m unimm.train --config configs/mot.py --workdir runs/mot

# The MMDiT (configs/mmdit_shapes.py), and MetaQuery on the demo's frozen model.
mmdit: setup
	$(PY) -m unimm.train --config configs/mmdit_shapes.py --workdir runs/mmdit_shapes

runs/demo/eval.json: | setup
	$(PY) -m unimm.train --config configs/demo.py --workdir runs/demo

metaquery: runs/demo/eval.json
	$(PY) -m unimm.train --config configs/metaquery_shapes.py --workdir runs/metaquery_shapes

smartedit: runs/demo/eval.json
	$(PY) -m unimm.train --config configs/smartedit_shapes.py --workdir runs/smartedit

# Fault injection (unimm/train/faults.py): a small demo model trained uninterrupted, then killed
# with SIGKILL at 20 moments (5 while a checkpoint save is in flight) and sent one SIGTERM,
# restarted each time; exit 0 only if it ends with the same parameters, optimizer state and
# data order. `make soak`: the full demo killed every 200 steps, the same eval.json expected.
FAULT_TRAIN := --config configs/demo.py --config.model.width=64 --config.model.depth=2 \
	--config.model.mlp_dim=192 --config.data.image_size=16 --config.data.batch_size=4 \
	--config.train.steps=300 --config.train.ckpt_every=10 --config.train.log_every=10 \
	--config.train.time_limit_s=0 --no_eval
faults: setup
	rm -rf runs/faults
	$(PY) -m unimm.train.faults --workdir runs/faults --kills 20 --save_kills 5 --sigterm 1 -- $(FAULT_TRAIN)

soak: setup
	rm -rf runs/soak
	$(PY) -m unimm.train.faults --workdir runs/soak --kill_every 200 -- --config configs/demo.py \
	  --config.train.time_limit_s=0 --config.train.ckpt_every=100

# libtpu (matching the installed jax) lets tests compile programs for TPU topologies on this
# host; kept off the venv's path (TPU_LIBRARY_PATH, set by tests/conftest.py) so that plain runs
# on a machine without TPUs do not try to start it.
$(VENV)/libtpu/.installed: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps --target $(VENV)/libtpu "$$($(PY) -c 'import importlib.metadata as m; print(next(r.split(";")[0].strip() for r in m.requires("jax") if r.startswith("libtpu")))')"
	touch $@

# the suite in TEST_WORKERS processes (pytest-xdist; tests compile far more than they run, and
# XLA compiles on one core)
TEST_WORKERS ?= auto
test: setup $(VENV)/libtpu/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=20 tests

# The train-step benchmark against the PyTorch peers on a GPU machine (launch/bench_gpu.sh says
# what it runs): JSON lines, tables and logs in $(OUT). It uses the machine's own Python.
OUT ?= runs/bench_gpu
bench-gpu:
	launch/bench_gpu.sh $(OUT)

clean:
	rm -rf $(VENV) runs
