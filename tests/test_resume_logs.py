"""A run killed with SIGKILL and resumed with `ckpt_path=auto` leaves the same logs as an uninterrupted run: every
step once in metrics.csv and in TensorBoard, the replayed steps' rows replaced rather than duplicated."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest

from codec_fixtures import MICRO_MODEL, MICRO_TASK, REPO, build_tiny_corpus, data_overrides

STEPS = 7       # 12 samples/epoch in batches of 4: 3 steps per epoch (epochs end after steps 2 and 5)
CKPT_EVERY = 4  # last.ckpt holds global step 4 (written at the end of the batch logged as step 3)
HOLD_AT = 6     # the first attempt is held (then killed) at the start of global step 6: steps 3-5 logged after
                # the checkpoint, with a validation (after step 5) and an epoch end in between


class HoldAt(L.Callback):
    """First attempt only: at the start of global step `at_step`, touch `<run dir>/held` and sleep until killed, so
    the SIGKILL lands at a known point however fast or slow the machine is."""

    def __init__(self, at_step: int, timeout: float = 300.0):
        self.at_step, self.timeout = int(at_step), float(timeout)

    def on_train_batch_start(self, trainer, *_):
        if trainer.global_step == self.at_step:
            Path(trainer.default_root_dir, "held").touch()
            time.sleep(self.timeout)  # the test kills the process long before this ends
            raise RuntimeError("HoldAt: nobody killed this run")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_tiny_corpus(tmp_path_factory.mktemp("corpus") / "demo")


def overrides(corpus: Path, run_name: str) -> list[str]:
    return ["recipe=codec_demo", *MICRO_MODEL, *MICRO_TASK, *data_overrides(corpus), "data.epoch_samples=12",
            f"trainer.max_steps={STEPS}", f"task.scheduler.total_steps={STEPS}", "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "validate_first=false",
            f"callbacks.checkpoint.every_n_train_steps={CKPT_EVERY}", "~callbacks.progress",
            "logger=default",  # CSV + TensorBoard
            # One thread: multi-threaded CPU reductions differ run to run in the last bits, resumed or not.
            "torch_threads=1", "experiment=resume_logs", f"run_name={run_name}"]


class Run:
    """train.py in a subprocess of its own session, output to a log file."""

    def __init__(self, root: Path, args: list[str], name: str):
        env = {**os.environ, "FLEXITRAIN_ROOT": str(root), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.log = root / f"{name}.log"
        with open(self.log, "w") as out:
            # Own session: the kill reaches the whole process group (data workers, if any) and nothing else.
            self.proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=root, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.is_file() else ""

    def finish(self, timeout: float = 300) -> str:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"train.py did not finish in {timeout} s:\n{self.tail()}")
        assert rc == 0, f"train.py exited with {rc}:\n{self.tail()}"
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv rows as {column: value} without the empty cells (the header may order columns differently)."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: its EventAccumulator applies the restart (purge) markers across event files."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def raw_tb_steps(run_dir: Path, tag: str) -> list[int]:
    """Steps of `tag` as written in the event files (no purging): the replayed steps appear twice."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def test_killed_run_resumes_with_each_step_logged_once(corpus, tmp_path):
    import torch

    runs = tmp_path / "runs" / "resume_logs"
    # The uninterrupted run and the first attempt of the killed one run side by side (one thread each).
    full = Run(tmp_path, overrides(corpus, "full"), "full")
    cut = Run(tmp_path, [*overrides(corpus, "cut"), f"+callbacks.hold._target_={__name__}.HoldAt",
                         f"+callbacks.hold.at_step={HOLD_AT}"], "cut-1")
    try:
        held = runs / "cut" / "held"
        deadline = time.time() + 300
        while not held.exists():
            if cut.proc.poll() is not None:
                raise AssertionError(f"the first attempt ended ({cut.proc.returncode}) before it was held:\n"
                                     f"{cut.tail()}")
            assert time.time() < deadline, f"the first attempt never reached step {HOLD_AT}:\n{cut.tail()}"
            time.sleep(0.2)
        os.killpg(cut.proc.pid, signal.SIGKILL)  # not a polite signal: no teardown, no flush, no checkpoint
        assert cut.proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        cut.kill()

    try:
        ckpt = runs / "cut" / "checkpoints" / "last.ckpt"
        assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == CKPT_EVERY
        before = csv_rows(runs / "cut")
        logged = {int(r["step"]) for r in before if "train/loss_g" in r}
        # Steps 3..5 were logged after the checkpoint; the resumed run redoes 4 and 5.
        assert logged == set(range(HOLD_AT)), logged
        assert any("val/mel_distance" in r and int(r["step"]) == 5 for r in before)

        resumed = Run(tmp_path, overrides(corpus, "cut"), "cut-2").finish()  # ckpt_path=auto: from last.ckpt
        assert "resuming from" in resumed and "last.ckpt" in resumed
        replayed = sum(int(r["step"]) >= CKPT_EVERY for r in before)  # train, lr, val and epoch-end rows of 4..6
        assert f"metrics.csv: replaced {replayed} row(s) of steps >= {CKPT_EVERY}" in resumed
        full.finish()
    finally:
        full.kill()

    # metrics.csv, row for row: the same rows in the same order with the same columns, each step's training row
    # once, and the same values to the last printed digit. Exact, no tolerance: the resumed run reproduces the
    # losses bit for bit on CPU with one thread (tests/test_codec_training_runs.py), so any difference means a row
    # came from the wrong attempt. Only the data/* input counters are compared by presence: they count what this
    # process read (a resumed process starts from zero and re-reads the batches it fast-forwards over).
    ref, got = csv_rows(runs / "full"), csv_rows(runs / "cut")
    train_steps = [int(r["step"]) for r in got if "train/loss_g" in r]
    assert train_steps == list(range(STEPS)), train_steps
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a.keys() == b.keys(), f"row {i}: columns differ: {sorted(a.keys() ^ b.keys())}"
        values = lambda row: {k: v for k, v in row.items() if not k.startswith("data/")}  # noqa: E731
        assert values(a) == values(b), f"row {i}: uninterrupted {values(a)} != resumed {values(b)}"

    # TensorBoard: the event files hold the replayed steps twice (two processes wrote them), but the restart
    # marker makes TensorBoard show each step once, with the resumed (= uninterrupted) values.
    raw = raw_tb_steps(runs / "cut", "train/loss_g")
    assert sorted(raw) == sorted([*range(STEPS), *range(CKPT_EVERY, HOLD_AT)]), raw
    ref_tb, got_tb = tb_scalars(runs / "full"), tb_scalars(runs / "cut")
    assert ref_tb.keys() == got_tb.keys()
    for tag in ref_tb:
        if tag.startswith("data/"):  # per-process input counters (see above): the steps must match
            assert [s for s, _ in got_tb[tag]] == [s for s, _ in ref_tb[tag]], tag
        else:
            assert got_tb[tag] == ref_tb[tag], tag
    assert [s for s, _ in got_tb["train/loss_g"]] == list(range(STEPS))


def test_csv_logger_replaces_rows_from_the_first_step_a_restarted_process_logs(tmp_path):
    from flexitrain.loggers import ResumableCSVLogger

    def attempt(steps, **kw):
        logger = ResumableCSVLogger(str(tmp_path), name="csv", version="", **kw)
        for s in steps:
            logger.log_metrics({"loss": float(s) + len(kw)}, step=s)
            logger.save()

    attempt(range(6))
    attempt(range(3, 8))  # resumed from a checkpoint at step 3: rows 3-5 are replaced
    rows = csv_rows(tmp_path)
    assert [(int(r["step"]), float(r["loss"])) for r in rows] == [(s, float(s)) for s in range(8)]
    attempt(range(7, 9), replace_replayed_steps=False)  # append-only: step 7 twice
    assert [int(r["step"]) for r in csv_rows(tmp_path)] == [*range(8), 7, 8]


def test_tensorboard_logger_marks_a_restart_only_in_a_directory_with_events(tmp_path):
    from flexitrain.loggers import ResumableTensorBoardLogger

    for steps in (range(6), range(3, 8)):
        logger = ResumableTensorBoardLogger(str(tmp_path), name="tensorboard", version="")
        for s in steps:
            logger.log_metrics({"loss": float(s) + 10 * (steps.start > 0)}, step=s)
        logger.finalize("success")
    assert sorted(raw_tb_steps(tmp_path, "loss")) == sorted([*range(6), *range(3, 8)])
    shown = tb_scalars(tmp_path)["loss"]
    assert shown == [(s, float(s) + 10 * (s >= 3)) for s in range(8)]
