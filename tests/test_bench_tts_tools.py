"""tools/bench_ar_tts.py and tools/bench_tts.py on tiny configurations: each states its settings and ends with its
one-line summary of figures (and of the official comparison, or why it was not run). The official comparisons
(flexicodec==0.1.2 in the same process, on the same weights and inputs) run only when $FLEXICODEC_OFFICIAL_FULL
names a pip --target folder set up as in tools/bench_ar_tts.py (the AR / NAR need transformers, funasr, ... and
the torchaudio wheel's pure-Python files, not only the package itself); they run in a subprocess so that the
official stack's packages and stubs do not leak into this test session."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))
pytestmark = pytest.mark.usefixtures("one_thread")

NUM = r"[\d.]+"
AR_LINE = re.compile(
    rf"^bench_ar_tts: ours {NUM} tok/s \(batch 1\), generate_batch {NUM} tok/s \(batch 1\), {NUM} tok/s \(batch 2\) "
    r"\| (?P<official>.*) \| config=tiny device=cpu precision=fp32 threads=1 cudnn\.benchmark=n/a "
    r"compile_step=False check_every=16 sample_batches=1,2 train_batch=(?P<train>\S+) text_len=12 prompt_len=6 "
    r"gen_tokens=16$")
TTS_LINE = re.compile(
    rf"^bench_tts: RTF {NUM} \(NAR \+ vocoder\) \| NAR {NUM} \| vocoder {NUM} \| (?P<batch>batch [^|]+) "
    r"\| (?P<official>.*) \| preset=tiny device=cpu \(CPU, 1 threads\) precision=fp32 threads=1 "
    r"cudnn\.benchmark=n/a tf32=n/a compile=off batch=(?P<n>\d+) seconds=2 prompt_seconds=1 steps=2 cfg=2 repeats=1"
    r"(?P<pipeline> pipeline_ar=tiny tau=0\.86 frames_per_token=2 g2p=off nar_batch=(?P<nar_batch>on|off))?$")
OFFICIAL_DIR = os.environ.get("FLEXICODEC_OFFICIAL_FULL")
needs_official = pytest.mark.skipif(
    not OFFICIAL_DIR, reason="FLEXICODEC_OFFICIAL_FULL is not set: no official flexicodec==0.1.2 stack to compare "
                             "with (set-up: tools/bench_ar_tts.py --help)")


def _last_lines(capsys, n=1):
    return capsys.readouterr().out.strip().splitlines()[-n:]


# ---- tools/bench_ar_tts.py ------------------------------------------------------------------------------------
AR_ARGS = ["--config", "tiny", "--gen-tokens", "16", "--text-len", "12", "--prompt-len", "6", "--sample-batches",
           "1,2"]


def test_ar_summary_states_settings_and_official_not_run(capsys):
    import bench_ar_tts

    report = bench_ar_tts.main(AR_ARGS + ["--skip-train"])
    summary, last = _last_lines(capsys, 2)
    m = AR_LINE.match(last)
    assert m, last
    assert m["train"] == "skipped" and m["official"].startswith("official not run (--official DIR; set-up: pip install")
    assert "flexicodec==0.1.2" in m["official"] and "torchaudio==2.11.0" in m["official"]
    assert summary.startswith("SUMMARY config=tiny") and "cudnn_benchmark=n/a" in summary  # the key=value line
    assert report["sampling"]["tokens"] == 16 and [b["batch"] for b in report["sampling_batched"]] == [1, 2]
    assert "official" not in report and report["settings"] in last


def test_ar_summary_with_training(capsys):
    import bench_ar_tts

    bench_ar_tts.main(AR_ARGS + ["--steps", "1", "--batch", "2", "--speech-len", "8"])
    m = AR_LINE.match(_last_lines(capsys)[0])
    assert m and m["train"] == "2"


def test_ar_official_folder_without_the_package_fails_early(tmp_path):
    import bench_ar_tts

    with pytest.raises(SystemExit, match="no flexicodec/transformers there; set-up: pip install"):
        bench_ar_tts.main(AR_ARGS + ["--skip-train", "--official", str(tmp_path)])


@needs_official
def test_ar_official_comparison_greedy_identical():
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "bench_ar_tts.py"), *AR_ARGS, "--skip-train", "--threads", "1",
           "--repeats", "1", "--official", OFFICIAL_DIR]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    last = res.stdout.strip().splitlines()[-1]
    m = AR_LINE.match(last)
    assert m, last
    assert re.fullmatch(rf"official {NUM} tok/s \(greedy; ours {NUM} tok/s\) \| ratio {NUM}x \| greedy identical: True",
                        m["official"]), m["official"]


# ---- tools/bench_tts.py ---------------------------------------------------------------------------------------
TTS_ARGS = ["--preset", "tiny", "--seconds", "2", "--prompt-seconds", "1", "--steps", "2", "--repeats", "1"]


def test_tts_summary_batch_1(capsys):
    import bench_tts

    out = bench_tts.main(TTS_ARGS)
    last = _last_lines(capsys)[0]
    m = TTS_LINE.match(last)
    assert m, last
    assert m["batch"] == "batch 1" and m["n"] == "1" and not m["pipeline"] and "pipeline" not in out
    assert m["official"].startswith("official NAR not run (--official DIR; set-up: pip install")
    assert out["rtf"] == pytest.approx(out["nar_rtf"] + out["vocoder_rtf"]) and out["nar_rtf"] > 0


@pytest.mark.skipif(importlib.util.find_spec("whisper") is None or importlib.util.find_spec("tiktoken") is None,
                    reason="openai-whisper / tiktoken not installed (the [tts] extra): no text front end")
@pytest.mark.parametrize("nar_batch", [None, "--nar-batch"])
def test_tts_summary_batch_through_the_pipeline(capsys, nar_batch):
    import bench_tts

    out = bench_tts.main(TTS_ARGS + ["--batch", "2"] + ([nar_batch] if nar_batch else []))
    last = _last_lines(capsys)[0]
    m = TTS_LINE.match(last)
    assert m, last
    how = "batched" if nar_batch else "per utterance"  # NARConfig.batch=None: per utterance on the CPU
    assert m["n"] == "2" and m["nar_batch"] == ("on" if nar_batch else "off") and re.fullmatch(
        rf"batch 2: RTF {NUM} \(TTSPipeline\.synthesize_batch, NAR {how}: AR {NUM}, NAR {NUM}, vocoder {NUM}\), NAR "
        rf"speed-up over batch 1 {NUM}x", m["batch"]), m["batch"]
    p = out["pipeline"]
    # 2 s -> 12 tokens of 2 frames each (the forced durations): 24 frames of 12.5 Hz per utterance
    assert p["tokens_per_utterance"] == 12 and p["audio_seconds"] == pytest.approx(2 * 24 / 12.5)
    assert p["nar_seconds"] > 0 and p["ar_seconds"] > 0 and p["rtf"] > 0


def test_tts_official_folder_without_the_package_fails_early(tmp_path):
    import bench_tts

    with pytest.raises(SystemExit, match="no flexicodec/transformers there"):
        bench_tts.main(TTS_ARGS + ["--official", str(tmp_path)])


@needs_official
def test_tts_official_nar_within_float32_tolerance():
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "bench_tts.py"), *TTS_ARGS, "--threads", "1",
           "--official", OFFICIAL_DIR]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    last = res.stdout.strip().splitlines()[-1]
    m = TTS_LINE.match(last)
    assert m, last
    assert re.fullmatch(rf"official NAR {NUM} \(ours, same weights {NUM}\) \| ratio {NUM}x \| mel within tolerance: "
                        r"True \(max \|Δ\| \S+ <= \S+\)", m["official"]), m["official"]


def test_official_configs_map_our_sizes():
    """Our constructor arguments -> the official ones, for the sizes the tools build (no official code needed)."""
    import bench_ar_tts
    import bench_tts

    from flexitrain.models.tts.ar_tts import released_config
    from flexitrain.models.tts.voicebox import RELEASED_CONFIG

    oc = bench_ar_tts.official_ar_config(released_config())
    assert (oc["llm_output_size"], oc["llm_linear_units"], oc["llm_num_blocks"], oc["text_encoder_linear_units"],
            oc["flex_framerate_options"]) == (1024, 5376, 16, 3584, [0.86, 0.91])
    vb, wrapper = bench_tts.official_voicebox_config(RELEASED_CONFIG)
    assert (vb["hidden_size"], vb["num_layers"], vb["cond_codebook_size"], vb["repa_layer_idx"], vb["cond_dim"]) == \
        (1024, 16, 32768, 6, 1024) and wrapper == {"ssl_feature_dim": 512, "repa_projection_dim": 512,
                                                     "use_repa_loss": True}
    assert Path(bench_ar_tts.TOOLS / "record_parity_vectors.py").is_file()
