"""tools/bench_codec.py at the released dimensions on a tiny input: it states its settings, runs the official code
(flexicodec==0.1.2, installed --no-deps on first use; skipped when the package index cannot be reached) in the same
run on the same weights and inputs, gets identical codes, and ends with its one-line summary. The tool runs in a
subprocess: the official code's import stubs (funasr, transformers, ...) must not reach this test session."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from tolerances import NETWORK_REL

sys.path.insert(0, str(REPO_ROOT / "tools"))

SUMMARY = re.compile(r"^bench_codec: ours [\d.]+ audio-s/s \(RTF [\d.]+\) \| (official [\d.]+ audio-s/s \| ratio "
                     r"[\d.]+x \| codes identical: (True|False)|official not run) \| device=cpu dtype=fp32 .*threads=1 .*"
                     r"cudnn\.benchmark=n/a .*compile=off", re.M)


def _bench(*args: str) -> tuple[dict, str]:
    """Run the tool in a subprocess; (its returned figures, its stdout)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_codec; "
            "out = bench_codec.main(sys.argv[2:]); print('RESULT ' + json.dumps(out))")
    res = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT / "tools"), *args], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-1].startswith("RESULT ")
    return json.loads(lines[-1][7:]), "\n".join(lines[:-1])


def test_summary_line_and_official_codes():
    import bench_codec

    try:
        bench_codec.official_package_dir()
    except RuntimeError as e:
        pytest.skip(str(e))
    out, text = _bench("--batch", "2", "--seconds", "1.5", "--repeats", "1", "--threads", "1")
    assert SUMMARY.search(text.strip().splitlines()[-1]), text[-800:]
    assert out["codes_identical"] is True
    # same codes through both decoders: float32 rounding only (the decoder ends in tanh: |audio| <= 1)
    assert out["max_audio_diff"] <= NETWORK_REL
    assert out["ours_audio_s_per_s"] > 0 and out["official_audio_s_per_s"] > 0


def test_without_official():
    out, text = _bench("--batch", "1", "--seconds", "1", "--repeats", "1", "--official", "none", "--threads", "1")
    last = text.strip().splitlines()[-1]
    assert SUMMARY.search(last) and "official not run" in last
    assert "ratio" not in out
