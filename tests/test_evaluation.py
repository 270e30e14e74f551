"""eval.py reports (complete, resumable), report comparison, and the training-time evaluation callback."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from codec_fixtures import REPO, build_tiny_corpus, data_overrides
from test_codec_task import loader, make_task, speechlike_batch


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_tiny_corpus(tmp_path_factory.mktemp("corpus") / "demo")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    task = make_task()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, train_dataloaders=loader([speechlike_batch()]))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def run_eval(out: Path, ckpt: Path, corpus: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "eval.py"), f"ckpt={ckpt}", f"out_dir={out}", "data=demo",
           *[o for o in data_overrides(corpus) if "epoch_samples" not in o], "max_utterances=4", "batch_size=2",
           "thresholds=[1.0,0.8]", "num_quantizers=[1,null]", "metrics.speaker.enabled=false", "metrics.num_workers=2",
           *extra]
    env = {**os.environ, "FLEXITRAIN_ROOT": str(out.parent)}
    res = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def test_eval_cli_writes_a_complete_report_and_resumes_without_recomputing(tiny_ckpt, corpus, tmp_path):
    out = tmp_path / "report"
    run_eval(out, tiny_ckpt, corpus)
    metrics = json.loads((out / "metrics.json").read_text())
    settings = metrics["settings"]
    assert set(settings) == {"ground_truth", "tau1_q1", "tau0.8_q1", "tau1_qall", "tau0.8_qall"}
    for name in ("tau1_q1", "tau1_qall"):
        s = settings[name]
        assert s["n"] == 4 and 0 < s["frame_rate"] <= 12.5
        for key in ("wer", "pesq_wb", "stoi", "mel_distance", "mos", "kbps"):
            assert key in s, (name, key)
    # Bitrate = pooled rate x bits/token (+ 3 bits of duration side info at a cap of 8); all RVQ stages: 15 + 2·5 bits.
    s = settings["tau1_qall"]
    assert s["rates"]["bits_per_token"] == 15 + 2 * 5
    assert s["kbps"] == pytest.approx(s["frame_rate"] * (25 + 3) / 1000)
    assert settings["tau0.8_q1"]["frame_rate"] <= settings["tau1_q1"]["frame_rate"]
    gt = settings["ground_truth"]
    assert gt["wer"] < 0.6, "the bundled ASR should transcribe espeak ground truth"
    meta = metrics["meta"]
    assert meta["model_hash"] and meta["seed"] == 0 and meta["config"]["thresholds"] == [1.0, 0.8]
    rows = list(csv.DictReader(open(out / "per_utterance.csv")))
    assert len(rows) == 4 * 5
    report = (out / "report.md").read_text()
    assert "Table 5 layout" in report and "ground truth" in report and "rate_quality.png" in report
    assert (out / "rate_quality.png").stat().st_size > 1000
    assert any(p.suffix == ".wav" for p in (out / "samples").iterdir())
    # Second run over the same directory: nothing is recomputed, the report is rewritten identically.
    run_eval(out, tiny_ckpt, corpus)
    again = json.loads((out / "metrics.json").read_text())
    assert again["meta"]["new_records"] == 0
    assert again["settings"] == settings
    # another model in the same directory: nothing stale is reused (the old records are moved aside)
    assert not list(out.glob("per_utterance.*.jsonl"))
    other = tmp_path / "other.ckpt"
    other.write_bytes(tiny_ckpt.read_bytes() + b"\0")  # same weights, different file hash
    run_eval(out, other, corpus)
    assert json.loads((out / "metrics.json").read_text())["meta"]["new_records"] == len(rows)
    assert len(list(out.glob("per_utterance.*.jsonl"))) == 1
    # compare_reports puts two reports side by side.
    cmp_out = tmp_path / "cmp"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "compare_reports.py"), str(out), str(out),
                          "--names", "a", "b", "--out", str(cmp_out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    table = (cmp_out / "comparison.md").read_text()
    assert table.count("| a |") == 5 and table.count("| b |") == 5 and (cmp_out / "comparison.png").is_file()


def test_eval_names_the_missing_checkpoint(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "eval.py"), f"ckpt={tmp_path}/nope.ckpt", f"out_dir={tmp_path}/r"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "nope.ckpt" in res.stderr and "does not exist" in res.stderr


@pytest.mark.parametrize("with_logger", [True, False])
def test_eval_callback_writes_table_plot_and_audio(corpus, tmp_path, with_logger):
    from flexitrain.callbacks import CodecEvalCallback
    from flexitrain.cluster import ResumableCSVLogger
    from flexitrain.data import AudioDataModule

    task = make_task()
    dm = AudioDataModule(train_shards=f"{corpus}/train", val_shards=f"{corpus}/valid", train_crop_seconds=0.64,
                         batch_seconds=2.6, max_batch_size=4, num_workers=0, epoch_samples=8)
    cb = CodecEvalCallback(thresholds=[1.0, 0.8], num_quantizers=[1, None], max_utterances=2,
                           metrics={"num_workers": 1, "quality": ["stoi", "mel_distance"], "asr": {"enabled": False},
                                    "speaker": {"enabled": False}, "mos": {"enabled": False}})
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="") if with_logger else False
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=1, val_check_interval=1, logger=logger,
                        callbacks=[cb], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(task, datamodule=dm)
    step_dir = tmp_path / "eval" / "step_00000001"
    summary = json.loads((step_dir / "metrics.json").read_text())["settings"]
    assert set(summary) == {"tau1_q1", "tau0.8_q1", "tau1_qall", "tau0.8_qall"}
    assert (step_dir / "report.md").is_file() and (step_dir / "rate_quality.png").is_file()
    assert len(list(step_dir.glob("*.wav"))) == 2 * 4 and len(list(step_dir.glob("*.png"))) == 2 * 4 + 1
    if with_logger:
        header = open(tmp_path / "csv" / "metrics.csv").readline()
        assert "eval/tau1_q1/frame_rate" in header and "eval/tau1_qall/mel_distance" in header
