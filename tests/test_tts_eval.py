"""The TTS mode of the eval CLI: cross-sentence pairs from a corpus, every configured frame rate, a complete
report (WER, SIM to the prompt, MOS, measured frame rate, RTF), resume without recomputation, item files."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from codec_fixtures import REPO, build_tiny_corpus, data_overrides
from conftest import requires_espeak
from tts_fixtures import write_task_checkpoints

pytestmark = requires_espeak


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_tiny_corpus(tmp_path_factory.mktemp("corpus") / "demo")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return write_task_checkpoints(tmp_path_factory.mktemp("ckpt"))


def run_tts_eval(out: Path, ckpts: dict, *extra: str) -> subprocess.CompletedProcess:
    # An untrained AR would stop at once: no EOS before 1 token per text id, at most 1 per text id.
    cmd = [sys.executable, str(REPO / "eval.py"), "--config-name", "eval_tts", f"ar={ckpts['ar']}",
           f"nar={ckpts['nar']}", f"vocoder={ckpts['vocoder']}", f"out_dir={out}", "sampling.min_token_text_ratio=1",
           "sampling.max_token_text_ratio=1", "nar_sampling.n_timesteps=2", "num_audio_samples=1", *extra]
    res = subprocess.run(cmd, cwd=out.parent, env={**os.environ, "FLEXITRAIN_ROOT": str(out.parent)},
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def test_tts_eval_over_corpus_pairs_writes_a_complete_report_and_resumes(ckpts, corpus, tmp_path):
    out = tmp_path / "report"
    data = [o for o in data_overrides(corpus) if "epoch_samples" not in o]
    run_tts_eval(out, ckpts, "data=demo", *data, "max_utterances=3", "frame_rates=[8.3,6.25]")
    metrics = json.loads((out / "metrics.json").read_text())
    settings = metrics["settings"]
    assert set(settings) == {"ground_truth", "fr8.3", "fr6.25"}
    for name, thr in (("fr8.3", 0.91), ("fr6.25", 0.86)):
        s = settings[name]
        assert s["n"] == 3 and s["threshold"] == thr and "failed" not in s
        for key in ("wer", "cer", "mos", "rtf", "rtf_ar", "rtf_nar", "rtf_vocoder"):
            assert key in s, (name, key)
        assert 0 < s["frame_rate"] <= 12.5 and s["rtf"] > 0
        # untrained models speak noise: the speaker encoder may find no voiced frame (NaN, counted as unscored)
        assert s.get("sim_unscored", 0) == 3 or -1 <= s["sim"] <= 1
    gt = settings["ground_truth"]
    assert gt["n"] == 3 and gt["wer"] < 0.9
    assert 0.5 < gt["sim"] < 0.999, "another sentence by the same espeak voice"
    rows = list(csv.DictReader(open(out / "per_utterance.csv")))
    assert len(rows) == 3 * 3
    pairs = [r for r in rows if r["setting"] == "fr8.3"]
    assert all(Path(r["prompt_wav"]).is_file() for r in pairs)
    assert all(Path(r["prompt_wav"]).stem != r["key"] for r in pairs)  # cross-sentence: another utterance
    records = [json.loads(line) for line in (out / "per_utterance.jsonl").read_text().splitlines()]
    assert all("sim" in r and "hypothesis" in r and "mos" in r for r in records)
    # The ground truth is scored like any hypothesis: tiny.en reads espeak well but not perfectly (its errors
    # differ between CPUs and CTranslate2 builds), so the best of the three utterances must be read nearly right.
    gt_rows = [r for r in records if r["setting"] == "ground_truth"]
    assert min(r["utt_wer"] for r in gt_rows) <= 0.25, [(r["hypothesis"], r["utt_wer"]) for r in gt_rows]
    report = (out / "report.md").read_text()
    assert "# TTS evaluation" in report and "| 8.3 | 0.91 |" in report and "| 6.25 | 0.86 |" in report
    assert "ground truth" in report
    assert sorted(p.name for p in (out / "samples").iterdir()) == sorted(
        f"{pairs[0]['key']}_{n}.wav" for n in ("fr8.3", "fr6.25"))
    run_tts_eval(out, ckpts, "data=demo", *data, "max_utterances=3", "frame_rates=[8.3,6.25]")
    again = json.loads((out / "metrics.json").read_text())
    assert again["meta"]["new_records"] == 0 and again["settings"] == settings
    # other sampling settings: the old records are not reused, they are kept aside
    run_tts_eval(out, ckpts, "data=demo", *data, "max_utterances=3", "frame_rates=[8.3,6.25]", "seed=1")
    assert json.loads((out / "metrics.json").read_text())["meta"]["new_records"] == 3 * 3
    stale = list(out.glob("per_utterance.*.jsonl"))
    assert len(stale) == 1 and len(stale[0].read_text().splitlines()) == 3 * 3


def test_tts_eval_from_an_item_file(ckpts, corpus, tmp_path):
    import soundfile as sf

    wav = next((corpus / "test").glob("*.tar"))  # any real speech will do as the prompt: take one from the shards
    import tarfile

    with tarfile.open(wav) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith((".flac", ".wav")))
        (tmp_path / ("prompt" + Path(member.name).suffix)).write_bytes(tar.extractfile(member).read())
    prompt = next(tmp_path.glob("prompt.*"))
    audio, sr = sf.read(str(prompt))
    assert len(audio) > sr // 2
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "a", "text": "The birch canoe slid on the smooth planks.",
                                 "prompt_wav": prompt.name, "prompt_text": "Hello."}) + "\n")
    out = tmp_path / "report"
    run_tts_eval(out, ckpts, f"items={items}", "frame_rates=[6.25]", "metrics.mos.enabled=false")
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert set(settings) == {"fr6.25"} and settings["fr6.25"]["n"] == 1 and "mos" not in settings["fr6.25"]
