# flexitrain: the README's commands. `make demo` (main job) and `make test` (the suite .ci/run calls)
# each set up everything themselves on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= data/demo
DEMO_REPORT ?= reports/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: setup demo demo-corpus test test-slow test-slurm test-all clean-demo

$(VENV)/.flexitrain-installed: pyproject.toml tools/setup_env.sh
	bash tools/setup_env.sh $(VENV)
	touch $@

setup: $(VENV)/.flexitrain-installed

demo-corpus: setup
	$(PY) tools/make_demo_corpus.py --out $(DEMO_DIR)

# Main job: demo corpus -> loader figures -> train the demo codec on CPU -> evaluate -> report.
demo: demo-corpus
	$(PY) tools/bench_loader.py --shards $(DEMO_DIR)/train --seconds 10
	$(PY) train.py recipe=codec_demo
	$(PY) eval.py ckpt=runs/codec_demo/main/checkpoints/last.ckpt data=demo "thresholds=[1.0,0.95,0.91,0.87]" "num_quantizers=[1,null]" max_utterances=40 out_dir=$(DEMO_REPORT)
	$(PY) tools/training_summary.py runs/codec_demo/main --append $(DEMO_REPORT)/report.md
	@echo "demo report: $(DEMO_REPORT)/report.md"

# Default suite. The real-SLURM tests (`make test-slurm`) are out of CI until the preemption test's flake is fixed.
test: setup
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: setup
	$(PY) -m pytest -q -p no:cacheprovider -m slow

test-slurm: setup
	$(PY) -m pytest -q -p no:cacheprovider -m slurm

test-all: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "slow or not slow"

clean-demo:
	rm -rf $(DEMO_DIR) runs/codec_demo $(DEMO_REPORT)
