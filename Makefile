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

# Main job: demo corpus -> loader figures -> Whisper teacher features (once, cached) -> the frame rates τ gives ->
# train the demo codec on CPU -> evaluate at τ 1.0 .. 0.65 -> report. (`recipe=codec_demo`, the same codec with a random
# SenseVoice teacher, is the plumbing recipe the tests use.) MOS is left out of the demo (~0.6 s per clip on CPU).
DEMO_RUN = runs/codec_demo_whisper/main
DEMO_TAUS = 1.0,0.85,0.75,0.7,0.65
DEMO_START := $(shell date +%s)
demo: demo-corpus
	$(PY) tools/bench_loader.py --shards $(DEMO_DIR)/train --seconds 5
	$(PY) tools/extract_teacher_features.py --shards $(DEMO_DIR)/train --teacher whisper_ct2 --out $(DEMO_DIR)/features/whisper_ct2/train
	$(PY) tools/frame_rates.py --shards $(DEMO_DIR)/test --teacher whisper_ct2 --thresholds $(DEMO_TAUS) --max-utterances 20
	$(PY) train.py recipe=codec_demo_whisper
	$(PY) eval.py ckpt=$(DEMO_RUN)/checkpoints/last.ckpt data=demo "thresholds=[$(DEMO_TAUS)]" "num_quantizers=[null]" \
		max_utterances=20 metrics.mos.enabled=false out_dir=$(DEMO_REPORT)
	$(PY) tools/training_summary.py $(DEMO_RUN) --append $(DEMO_REPORT)/report.md > /dev/null
	@echo ""
	@echo "demo done in $$(( ($$(date +%s) - $(DEMO_START)) / 60 )) min $$(( ($$(date +%s) - $(DEMO_START)) % 60 )) s"
	@echo "  report:      $(DEMO_REPORT)/report.md  (rate-quality plot, spectrograms with merge boundaries beside it)"
	@echo "  checkpoint:  $(DEMO_RUN)/checkpoints/last.ckpt"
	@echo "  audio:       $(DEMO_REPORT)/samples/  (reference and reconstruction per τ)"
	@echo "  training:    $(DEMO_RUN)  (config.yaml, train.log, csv/, tensorboard/)"

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
	rm -rf $(DEMO_DIR) runs/codec_demo runs/codec_demo_whisper $(DEMO_REPORT)
