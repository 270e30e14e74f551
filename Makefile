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

.PHONY: setup demo demo-corpus tts-demo test test-slow test-slurm test-all clean-demo

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

# FlexiCodec-TTS on CPU: the three tiny demo stages (AR, NAR, Vocos; targets from one seeded random tiny codec),
# then one sentence spoken in a new espeak-ng voice and the TTS evaluation at 8.3 and 6.25 Hz (about 6 min on 2
# cores). --min-prompt-pace: the tiny AR learns absolute utterance lengths, so EOS is held back to the prompt's pace.
TTS_REPORT ?= reports/tts_demo
TTS_MODELS = --ar runs/ar_tts_demo/main/checkpoints/last.ckpt --nar runs/nar_voicebox_demo/main/checkpoints/last.ckpt \
	--vocoder runs/vocos_24k_demo/main/checkpoints/last.ckpt
tts-demo: demo-corpus
	$(PY) train.py recipe=ar_tts_demo
	$(PY) train.py recipe=nar_voicebox_demo
	$(PY) train.py recipe=vocos_24k_demo
	mkdir -p $(TTS_REPORT)
	espeak-ng -v en-us+f2 -w $(TTS_REPORT)/prompt.wav "The boy was there when the sun rose."
	$(PY) -m flexitrain.tts.cli $(TTS_MODELS) --prompt-wav $(TTS_REPORT)/prompt.wav \
		--prompt-text "The boy was there when the sun rose." --text "A rod is used to catch pink salmon." \
		--frame-rate 8.3 --min-prompt-pace 0.8 --out $(TTS_REPORT)/hello_8.3hz.wav
	$(PY) eval.py --config-name eval_tts ar=runs/ar_tts_demo/main/checkpoints/last.ckpt \
		nar=runs/nar_voicebox_demo/main/checkpoints/last.ckpt vocoder=runs/vocos_24k_demo/main/checkpoints/last.ckpt \
		data=demo max_utterances=10 "frame_rates=[8.3,6.25]" min_prompt_pace=0.8 out_dir=$(TTS_REPORT)
	@echo "TTS demo: $(TTS_REPORT)/hello_8.3hz.wav, report $(TTS_REPORT)/report.md"

# Default suite; the numerical-parity tests again under two other MKL arithmetic paths (only the files that hold
# them are collected: seconds); then the real one-node SLURM tests (they skip themselves where SLURM cannot be started).
PARITY_TESTS = -m "parity and not slow and not slurm" $$(grep -l 'mark\.parity' tests/test_*.py)
test: setup
	$(PY) -m pytest -q -p no:cacheprovider
	MKL_CBWR=COMPATIBLE $(PY) -m pytest -q -p no:cacheprovider $(PARITY_TESTS)
	MKL_ENABLE_INSTRUCTIONS=AVX2 $(PY) -m pytest -q -p no:cacheprovider $(PARITY_TESTS)
	$(PY) -m pytest -q -p no:cacheprovider -m slurm

test-slow: setup
	$(PY) -m pytest -q -p no:cacheprovider -m slow

test-slurm: setup
	$(PY) -m pytest -q -p no:cacheprovider -m slurm

test-all: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "slow or not slow"

clean-demo:
	rm -rf $(DEMO_DIR) runs/codec_demo $(DEMO_REPORT)
