#!/usr/bin/env bash
# Every GPU figure of issues 13 (training) and 14 (inference) in one prepared run, for a device machine with torch and
# lightning but not this project's other requirements: those are carried as wheels in .whl/ (pure-Python ones from
# `pip download --no-deps -d .whl hydra-core omegaconf antlr4-python3-runtime webdataset braceexpand soxr soundfile
# safetensors ...`, as the device README says) and installed into /tmp/site.
# Stages run in order, each under its own timeout, each writing <stage>.log (+ .json) to $OUT and its summary line
# to $OUT/summary.txt; pick them with STAGES (default: all, about 9 minutes on an H200 after the wheel install):
#
#   codec_step   bench_train codec_12hz, bf16, 8 x 6 s: eager, eager + cudnn.benchmark, compiled; then compiled at
#                the recipe's per-GPU batch (MFU target); .before/ (old tree) eager if present
#   ar_train     bench_train ar_tts (released size), bf16: MFU
#   codec_infer  bench_codec released, 64 x 10 s: fp32 vs official fp32 (codes identical), bf16 vs official bf16,
#                bf16 + compile
#   ar_sample    bench_ar_tts released, bf16: batch 1 and 8, eager and --compile-step
#   tts          bench_tts released: NAR + Vocos RTF for 4 s after a 3 s prompt, bf16; batch 8 with --nar-batch
#   extract      extract_tokens on the demo shards (data/demo/train, carried) with a released-size random codec and a
#                SenseVoice-size (50 blocks) random teacher: hours of audio per hour
#
#   STAGES="codec_step codec_infer" OUT=out bash tools/gpu/measure_all.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
STAGES=${STAGES:-"codec_step ar_train codec_infer ar_sample tts extract"}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" >> "$OUT/gpu.txt" 2>&1

run() {  # name timeout pattern-of-the-summary-line script args...
  local name=$1 t=$2 pat=$3; shift 3
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  timeout "$t" python3 "$@" > "$OUT/$name.log" 2>&1
  echo "rc $?" >> "$OUT/summary.txt"
  grep -E "$pat" "$OUT/$name.log" | tail -n 2 >> "$OUT/summary.txt"
}
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }

STEP="--recipe codec_12hz --device cuda --precision bf16-mixed --warmup 5 --steps 20"
if has codec_step; then
  run step_eager 90 "^bench_train:" tools/bench_train.py $STEP --batch 8 --seconds 6 --json "$OUT/step_eager.json"
  run step_cudnn 90 "^bench_train:" tools/bench_train.py $STEP --batch 8 --seconds 6 --cudnn-benchmark \
    --json "$OUT/step_cudnn.json"
  run step_compile 200 "^bench_train:" tools/bench_train.py $STEP --batch 8 --seconds 6 --compile \
    "task.compile={teacher:false}" --json "$OUT/step_compile.json"
  run step_recipe_batch 200 "^bench_train:" tools/bench_train.py $STEP --compile "task.compile={teacher:false}" \
    --json "$OUT/step_recipe_batch.json"
  [ -d .before ] && run step_before 90 "^bench_train:" .before/tools/bench_train.py $STEP --batch 8 --seconds 6
fi
if has ar_train; then
  run ar_train 150 "^bench_train:" tools/bench_train.py --task ar_tts --recipe ar_tts --device cuda \
    --precision bf16-mixed --warmup 5 --steps 20 --json "$OUT/ar_train.json"
fi
CODEC="tools/bench_codec.py --device cuda --batch 64 --seconds 10 --repeats 3"
if has codec_infer; then
  run codec_fp32 120 "^bench_codec:" $CODEC
  run codec_bf16 120 "^bench_codec:" $CODEC --dtype bf16 --official-dtype bf16
  run codec_bf16_compile 200 "^bench_codec:" $CODEC --dtype bf16 --official-dtype bf16 --compile
fi
AR="tools/bench_ar_tts.py --config released --device cuda --precision bf16 --skip-train"
if has ar_sample; then
  run ar_sample 120 "^bench_ar_tts:" $AR
  run ar_sample_compiled 200 "^bench_ar_tts:" $AR --compile-step
fi
if has tts; then
  run tts_batch1 120 "^bench_tts:" tools/bench_tts.py --device cuda --precision bf16 --seconds 4 --prompt-seconds 3
  run tts_batch8 150 "^bench_tts:" tools/bench_tts.py --device cuda --precision bf16 --seconds 4 --prompt-seconds 3 \
    --batch 8 --nar-batch
fi
if has extract; then
  python3 -c "import torch; from flexitrain.models.codec import RELEASED_CONFIG, FlexiCodec; torch.manual_seed(0); \
FlexiCodec(**RELEASED_CONFIG).save_pretrained('/tmp/released_codec')" > "$OUT/extract_model.log" 2>&1
  run extract 240 "^summary:|^settings:" tools/extract_tokens.py --shards data/demo/train --out /tmp/tokens \
    --ckpt /tmp/released_codec --teacher-random-init --teacher-blocks 50 --thresholds 0.86 0.91 --device cuda
fi
cat "$OUT/summary.txt"
