#!/usr/bin/env bash
# One prepared GPU check of the codec GAN step (issue 13), for a machine with torch + lightning but not this
# project's other requirements: install carried wheels (.whl/, see the device README), then bench_train.py on
# the old tree (.before/: `git archive <commit> flexitrain configs recipes` + today's tools/bench_train.py and
# flexitrain/utils/dispatch_count.py) and on this tree, eager and compiled. Figures go to $OUT (default ./out).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" >> "$OUT/gpu.txt" 2>&1
COMMON="--recipe codec_12hz --device cuda --precision bf16-mixed --batch ${BATCH:-8} --seconds 6 --warmup 5 --steps 20"
run() {  # name timeout script args...
  local name=$1 t=$2; shift 2
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  timeout "$t" python3 "$@" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "rc $?" >> "$OUT/summary.txt"; grep "^bench_train:" "$OUT/$name.log" >> "$OUT/summary.txt"
  tail -n 40 "$OUT/$name.log" | grep -v "^bench_train:" | tail -n 8 | sed 's/^/   /' >> "$OUT/summary.txt"
}
[ -z "${SKIP_EAGER:-}" ] && run after_eager ${T_EAGER:-90} tools/bench_train.py $COMMON
run after_compile ${T_COMPILE:-200} tools/bench_train.py $COMMON --compile "task.compile={teacher:false}"
[ -d .before ] && run before_eager ${T_EAGER:-90} .before/tools/bench_train.py $COMMON
cat "$OUT/summary.txt"
