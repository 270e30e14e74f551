#!/usr/bin/env bash
# Set up everything flexitrain needs on a fresh Debian/Ubuntu machine: system packages (espeak-ng, sox),
# a virtual environment with the CPU torch pin, and the project with its extras. Idempotent.
#   usage: tools/setup_env.sh [VENV_DIR]   (default .venv)
set -euo pipefail
VENV=${1:-.venv}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}   # keep on every pip line: an unpinned torch pulls several GB of CUDA wheels

need_apt=()
command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
command -v sox >/dev/null || need_apt+=(sox)
command -v make >/dev/null || need_apt+=(make)
python3 -c "import ensurepip" 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "[setup] apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
echo "[setup] pip install $TORCH_PIN + flexitrain[dev,eval,cluster] into $VENV"
"$PY" -m pip install -q --disable-pip-version-check "$TORCH_PIN" -e ".[dev,eval,cluster,tts]"
# openai-whisper's tokenizer assets (Whisper BPE for the TTS text front end); --no-deps skips its triton pin.
"$PY" -m pip install -q --disable-pip-version-check --no-deps openai-whisper
"$PY" -c "import torch, lightning, flexitrain; print('[setup] torch', torch.__version__, '| lightning', lightning.__version__)"
