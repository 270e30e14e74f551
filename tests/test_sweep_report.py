"""tools/sweep_report.py on a fake multirun directory: finished, failed (submitit error, also before Hydra made the
trial directory) and unfinished trials."""
from __future__ import annotations

import csv
import importlib.util
import json
import pickle
import types
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sweep_report", REPO / "tools" / "sweep_report.py")
sweep_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep_report)

COMMON = ["recipe=codec_demo", "+sweep=distill_weight"]


def make_trial(sweep: Path, num: int, distill: float) -> Path:
    trial = sweep / str(num)
    (trial / ".hydra").mkdir(parents=True)
    (trial / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"task.loss_weights.distill={distill}", *COMMON]))
    (trial / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    return trial


def submitit_job(sweep: Path, num: int, distill: float, result) -> None:
    folder = sweep / ".submitit" / f"77_{num}"
    folder.mkdir(parents=True)
    submitted = types.SimpleNamespace(args=([f"task.loss_weights.distill={distill}", *COMMON], "hydra.sweep.dir", num,
                                            f"job_id_for_{num}", {}))
    (folder / f"77_{num}_submitted.pkl").write_bytes(pickle.dumps(submitted))
    if result is not None:
        (folder / f"77_{num}_0_result.pkl").write_bytes(pickle.dumps(result))


@pytest.fixture
def fake_sweep(tmp_path) -> Path:
    sweep = tmp_path / "runs" / "codec_demo" / "sweep_distill_weight"
    # 0: finished, with two in-training evaluations (the later one must be used)
    t0 = make_trial(sweep, 0, 0.0)
    (t0 / "summary.json").write_text(json.dumps({"global_step": 300, "metrics": {
        "val/mel_distance": 1.25, "train/loss_mel": 1.5, "threshold": 0.9}}))
    for step, pesq in ((100, 1.1), (300, 1.9)):
        d = t0 / "eval" / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"step": step, "settings": {
            "tau1_qall": {"n": 8, "pesq_wb": pesq, "frame_rate": 12.5, "rates": {"pooled": 1}}}}))
    submitit_job(sweep, 0, 0.0, ("success", None))
    # 1: failed: submitit recorded the exception
    t1 = make_trial(sweep, 1, 5.0)
    (t1 / "csv").mkdir()
    (t1 / "csv" / "metrics.csv").write_text("step,train/loss_mel\n0,3.0\n9,2.5\n")
    submitit_job(sweep, 1, 5.0, ("error", "Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory"))
    # 2: unfinished (preempted, waiting in the queue): a CSV up to step 150, no result yet
    t2 = make_trial(sweep, 2, 15.0)
    (t2 / "csv").mkdir()
    (t2 / "csv" / "metrics.csv").write_text("step,train/loss_mel\n0,3.0\n150,2.0\n120,2.1\n")
    submitit_job(sweep, 2, 15.0, None)
    # 3: failed before Hydra created its directory: only submitit knows about it
    submitit_job(sweep, 3, 30.0, ("error", "Traceback (most recent call last):\nImportError: no module named foo"))
    return sweep


def test_collect_statuses_and_metrics(fake_sweep):
    trials = {t["num"]: t for t in sweep_report.collect(fake_sweep)}
    assert [trials[i]["status"] for i in range(4)] == ["finished", "failed", "unfinished", "failed"]
    assert trials[0]["global_step"] == 300
    assert trials[0]["metrics"]["val/mel_distance"] == 1.25
    assert trials[0]["metrics"]["eval/tau1_qall/pesq_wb"] == 1.9  # the latest evaluation
    assert "eval/tau1_qall/rates" not in trials[0]["metrics"]
    assert trials[1]["error"] == "RuntimeError: CUDA out of memory"
    assert trials[1]["global_step"] == 9
    assert trials[2]["global_step"] == 150 and trials[2]["error"] is None
    assert trials[3]["trial"] == "job 3" and trials[3]["params"]["task.loss_weights.distill"] == "30.0"
    assert trials[3]["params"]["sweep"] == "distill_weight"  # `+` stripped from the key


def test_report_files(fake_sweep, tmp_path):
    out = tmp_path / "report"
    assert sweep_report.main([str(fake_sweep), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["status"] for r in rows] == ["finished", "failed", "unfinished", "failed"]
    assert [r["task.loss_weights.distill"] for r in rows] == ["0.0", "5.0", "15.0", "30.0"]
    assert "recipe" not in rows[0]  # only swept keys become columns
    assert rows[0]["eval/tau1_qall/pesq_wb"] == "1.9" and rows[1]["val/mel_distance"] == ""
    md = (out / "sweep.md").read_text()
    assert "4 trials: 1 finished, 2 failed, 1 unfinished." in md
    header = md.splitlines()[4]
    assert header.startswith("| trial | task.loss_weights.distill | status | step | val/mel_distance |"), header
    assert "| **failed** |" in md and "| **unfinished** |" in md
    assert "- job 3: `ImportError: no module named foo`" in md
    if importlib.util.find_spec("matplotlib"):
        assert (out / "sweep.png").stat().st_size > 1000


def test_empty_directory_is_an_error(tmp_path, capsys):
    assert sweep_report.main([str(tmp_path)]) == 1
    assert "no trials" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        sweep_report.collect(tmp_path / "missing")
