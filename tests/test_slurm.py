"""SLURM launches, preemption and sweeps.

Fast checks (default suite): the sbatch templates parse and render with sample resources; the preemption
callback checkpoints at a step boundary on SIGUSR1 and a resumed run reproduces the uninterrupted losses.

Real-scheduler checks (`make test-slurm`, marker `slurm`): tools/slurm_local.sh starts a one-node cluster, then
(a) sbatch the demo recipe, (b) preempt it from the high-priority partition (USR1 -> checkpoint -> requeue) and
requeue it hard (`scontrol requeue`: SIGTERM, no checkpoint -> back from the last periodic checkpoint), and each
time the run must finish with the same final step and per-step losses as the uninterrupted run; (c) a 2-trial
Hydra multirun through the submitit SLURM launcher, summarised by tools/sweep_report.py.
They train the tiny demo codec (FLEXITRAIN_SLURM_TASK=standin: a linear stand-in, for the scheduler plumbing
alone) and take about 3 min on 2 cores plus the cluster's first start (apt install, ~10 s).
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = {"single": REPO / "recipes/slurm/train.sbatch", "multi": REPO / "recipes/slurm/train_multinode.sbatch"}


# ---------------------------------------------------------------- stand-in task (tiny, exact resume by design)
class TinyTask(L.LightningModule):
    """A linear regression whose batch is a function of the global step, so exact resume needs only the weights
    and Adam state; `step_seconds` slows steps down so a signal lands mid-run. Config keys of the codec task
    are accepted and ignored, so `task._target_=test_slurm.TinyTask` swaps it into any recipe."""

    def __init__(self, step_seconds: float = 0.0, lr: float = 0.05, **_ignored):
        super().__init__()
        self.net = torch.nn.Linear(8, 1)
        self.step_seconds, self.lr = float(step_seconds), float(lr)

    def training_step(self, batch, batch_idx):
        g = torch.Generator().manual_seed(int(self.global_step))
        x = torch.randn(16, 8, generator=g)
        loss = torch.nn.functional.mse_loss(self.net(x), x.sum(1, keepdim=True))
        self.log("train/loss", loss)
        if self.step_seconds:
            time.sleep(self.step_seconds)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class PauseForSignal(L.Callback):
    """First attempt only: stop at the end of step `at_step`, touch `<run dir>/paused` and wait until the
    PreemptionCheckpoint callback has a pending signal (or SLURM kills the job). The test sends its signal
    while training is held here, so the job cannot finish first however fast the steps are (a 12-step demo
    run on an idle 2-core box used to end before the high-priority job was even scheduled)."""

    def __init__(self, at_step: int, timeout: float = 240.0):
        self.at_step, self.timeout = int(at_step), float(timeout)

    def on_train_batch_end(self, trainer, *_):
        if trainer.global_step != self.at_step or int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
            return
        from flexitrain.cluster import PreemptionCheckpoint

        watch = [c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)]
        Path(trainer.default_root_dir, "paused").touch()
        deadline = time.time() + self.timeout
        while time.time() < deadline and not any(c.pending for c in watch):
            time.sleep(0.1)


class TinyData(L.LightningDataModule):
    def __init__(self, **_ignored):
        super().__init__()

    def train_dataloader(self):
        return DataLoader(torch.zeros(100000, 1), batch_size=1)


# ---------------------------------------------------------------- templates (default suite)
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_sbatch_template_parses_and_requests_requeue(name):
    path = TEMPLATES[name]
    subprocess.run(["bash", "-n", str(path)], check=True)
    directives = [line.split(None, 1)[1] for line in path.read_text().splitlines() if line.startswith("#SBATCH ")]
    assert "--requeue" in directives
    assert any(re.fullmatch(r"--signal=USR1@\d+", d) for d in directives), directives  # no B:, python gets it
    assert "--open-mode=append" in directives  # a requeued job appends to its log


@pytest.mark.parametrize("name,env,devices,nodes", [
    ("single", {"SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "4"}, 4, 1),
    ("multi", {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8(x2)"}, 8, 2),
    ("multi", {"SLURM_NNODES": "4", "SLURM_NTASKS": "16"}, 4, 4),
])
def test_sbatch_template_renders_resources(name, env, devices, nodes, tmp_path):
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **env,
            "DRY_RUN": "1", "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(tmp_path), "VENV": str(tmp_path / "none")}
    out = subprocess.run(["bash", str(TEMPLATES[name]), "recipe=codec_12hz", "run_name=a"], env=full,
                         capture_output=True, text=True, check=True).stdout
    assert f"trainer.devices={devices} trainer.num_nodes={nodes} recipe=codec_12hz run_name=a" in out, out
    assert out.split(": ", 1)[1].startswith("srun --kill-on-bad-exit=1 "), out


# ---------------------------------------------------------------- preemption callback (default suite)
def _fit(root: Path, max_steps: int, callbacks=(), ckpt_path=None, every=4):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from flexitrain.cluster import ResumableCSVLogger

    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=every, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=ResumableCSVLogger(root, name="csv", version=""),
                        callbacks=[ckpt, *callbacks], default_root_dir=root, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(TinyTask(), datamodule=TinyData(), ckpt_path=ckpt_path)
    return trainer


class _SignalAt(L.Callback):
    """Sends a signal to this process in the middle of training step `step` (as SLURM would, asynchronously)."""

    def __init__(self, step: int, signum=signal.SIGUSR1):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, *_):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_preemption_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    from flexitrain.cluster import Preempted, PreemptionCheckpoint, newest_checkpoint

    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    ref = _fit(tmp_path / "ref", 12)
    ref_losses = read_losses(tmp_path / "ref")
    run = tmp_path / "run"
    cb = PreemptionCheckpoint()
    try:
        with pytest.raises(Preempted) as exc:
            _fit(run, 12, callbacks=[cb, _SignalAt(6)])
    finally:
        cb.restore_signal_handlers()
    assert exc.value.code == 128 + signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert Path(cb.saved).name == "hpc_ckpt_1.ckpt"
    assert torch.load(cb.saved, weights_only=True)["global_step"] == 7  # the step that got the signal finished
    newest = newest_checkpoint(run / "checkpoints", run)
    assert newest == cb.saved  # step 7 beats last.ckpt (step 4)
    cb2 = PreemptionCheckpoint()
    _fit(run, 12, callbacks=[cb2], ckpt_path=newest)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handed back after a normal end
    assert read_losses(run) == ref_losses  # steps 0-6 from the first attempt (kept by ResumableCSVLogger)
    assert newest_checkpoint(run / "checkpoints", run).endswith("last.ckpt")  # last.ckpt (step 12) is newer now


def test_newest_checkpoint_skips_truncated_files(tmp_path):
    from flexitrain.cluster import newest_checkpoint, resolve_resume_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    assert newest_checkpoint(ckpts, tmp_path) is None
    torch.save({"global_step": 10}, ckpts / "last.ckpt")
    torch.save({"global_step": 17}, tmp_path / "hpc_ckpt_3.ckpt")  # Lightning's own location (run dir)
    assert newest_checkpoint(ckpts, tmp_path) == str(tmp_path / "hpc_ckpt_3.ckpt")
    (ckpts / "hpc_ckpt_4.ckpt").write_bytes(b"PK\x03\x04 cut short")
    assert newest_checkpoint(ckpts, tmp_path) == str(tmp_path / "hpc_ckpt_3.ckpt")
    assert resolve_resume_checkpoint(None, ckpts, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="ckpt_path='nope.ckpt' does not exist"):
        resolve_resume_checkpoint("nope.ckpt", ckpts, tmp_path)


# ---------------------------------------------------------------- helpers for the real-cluster tests
def read_losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """Per-step values from the CSV log; for a step logged twice (redone after a resume) the last one counts."""
    out: dict[int, float] = {}
    with open(run_dir / "csv" / "metrics.csv") as fh:
        for row in csv.DictReader(fh):
            if row.get(key) not in (None, ""):
                out[int(float(row["step"]))] = float(row[key])
    return out


def logged_steps(run_dir: Path, key: str = "train/loss") -> list[int]:
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as fh:
        return [int(float(r["step"])) for r in csv.DictReader(fh) if r.get(key) not in (None, "")]


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_job(job: str, timeout: float, log: Path | None = None) -> dict[str, str]:
    def done():
        info = job_info(job)
        return info if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                                "OUT_OF_MEMORY") else None
    try:
        return wait_for(done, timeout, f"job {job}")
    except TimeoutError:
        subprocess.run(["scancel", job])
        raise AssertionError(f"job {job} did not finish: {job_info(job)}\n{_tail(log)}")


def _tail(path: Path | None, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path and path.is_file() else ""


@pytest.fixture(scope="module")
def cluster():
    """The local cluster of tools/slurm_local.sh (default state dir); stopped afterwards if this fixture started it."""
    if shutil.which("sbatch") is None and os.geteuid() != 0:
        pytest.skip("no SLURM here and not root: cannot install the local cluster (tools/slurm_local.sh)")
    script = REPO / "tools/slurm_local.sh"
    t0 = time.time()
    res = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    conf = subprocess.run(["bash", str(script), "env"], capture_output=True, text=True, check=True).stdout
    os.environ["SLURM_CONF"] = conf.strip().split("=", 1)[1]
    print(f"[slurm] local cluster up in {time.time() - t0:.1f} s")
    yield os.environ["SLURM_CONF"]
    if "already running" not in res.stdout:
        subprocess.run(["bash", str(script), "stop"])


# The run every real-cluster test trains: the demo recipe, tiny. FLEXITRAIN_SLURM_TASK=standin swaps in TinyTask
# (a linear model, 0.4 s a step) to test the scheduler plumbing alone; `demo` trains the real tiny codec.
SLURM_TASK = os.environ.get("FLEXITRAIN_SLURM_TASK", "demo")
if SLURM_TASK == "demo":
    MAX_STEPS, CKPT_EVERY, LOSS_KEY = 12, 4, "train/loss_g"
    TASK = ["validate_first=false", "trainer.val_check_interval=100000", "data.epoch_samples=64",
            "data.train_crop_seconds=0.5", "data.batch_seconds=1.0", "data.max_batch_size=2", "data.num_workers=1",
            f"paths.data_dir={REPO / 'data'}", "++torch_threads=1"]
else:
    MAX_STEPS, CKPT_EVERY, LOSS_KEY = 24, 8, "train/loss"
    TASK = ["task._target_=test_slurm.TinyTask", "+task.step_seconds=0.4", "data._target_=test_slurm.TinyData",
            "validate_first=false"]
COMMON = ["recipe=codec_demo", "logger=csv", "logger.csv._target_=flexitrain.cluster.ResumableCSVLogger",
          f"trainer.max_steps={MAX_STEPS}", "trainer.log_every_n_steps=1", "+logger.csv.flush_logs_every_n_steps=1",
          f"callbacks.checkpoint.every_n_train_steps={CKPT_EVERY}",
          "++callbacks.preemption._target_=flexitrain.cluster.PreemptionCheckpoint", *TASK]


# The interrupted runs hold training after step CKPT_EVERY + 2 until their signal arrives (PauseForSignal).
PAUSE = ["+callbacks.pause._target_=test_slurm.PauseForSignal", f"+callbacks.pause.at_step={CKPT_EVERY + 2}"]


def job_env(root: Path) -> dict[str, str]:
    return {**os.environ, "FLEXITRAIN_ROOT": str(root), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")]),
            "HYDRA_FULL_ERROR": "1"}


def submit(root: Path, name: str, *overrides: str, partition: str = "debug", cpus: int = 1) -> tuple[str, Path]:
    log = root / f"{name}.out"
    cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--partition={partition}", "--nodes=1",
           "--ntasks-per-node=1", "--gpus-per-node=0", f"--cpus-per-task={cpus}", "--time=15", f"--output={log}",
           str(TEMPLATES["single"]), *COMMON, f"experiment={name}", *overrides]
    job = subprocess.run(cmd, cwd=REPO, env=job_env(root), capture_output=True, text=True, check=True).stdout.strip()
    return job.split(";")[0], log


def finished_run(root: Path, name: str, job: str, log: Path, timeout: float = 400) -> dict:
    info = wait_job(job, timeout, log)
    run_dir = root / "runs" / name / "main"
    assert info["JobState"] == "COMPLETED", f"{info}\n{_tail(log)}"
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"info": info, "summary": summary, "losses": read_losses(run_dir, LOSS_KEY), "run_dir": run_dir,
            "log": log.read_text(errors="replace")}


@pytest.fixture(scope="module")
def demo_corpus():
    if SLURM_TASK != "demo":
        return None
    corpus = REPO / "data" / "demo"
    if not (corpus / "train").is_dir():
        if shutil.which("espeak-ng") is None:
            pytest.skip("espeak-ng missing: cannot build the demo corpus")
        subprocess.run([sys.executable, "tools/make_demo_corpus.py", "--out", str(corpus)], cwd=REPO, check=True)
    return corpus


@pytest.fixture(scope="module")
def reference_run(cluster, demo_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    t0 = time.time()
    job, log = submit(root, "ref")
    run = finished_run(root, "ref", job, log)
    run["seconds"] = time.time() - t0
    return run


# ---------------------------------------------------------------- (a) sbatch the demo recipe
@pytest.mark.slurm
def test_a_sbatch_demo_recipe(reference_run):
    s = reference_run["summary"]
    assert s["global_step"] == MAX_STEPS and s["resumed_from"] is None
    assert sorted(reference_run["losses"]) == list(range(MAX_STEPS))
    assert reference_run["info"]["Restarts"] == "0"
    assert "trainer.devices=1 trainer.num_nodes=1" in reference_run["log"]
    print(f"[slurm] uninterrupted sbatch run: {reference_run['seconds']:.1f} s")


def _assert_same_as_reference(run, reference_run):
    assert run["summary"]["global_step"] == reference_run["summary"]["global_step"] == MAX_STEPS
    assert run["losses"].keys() == reference_run["losses"].keys()
    for step, value in reference_run["losses"].items():
        assert run["losses"][step] == pytest.approx(value, rel=1e-6, abs=1e-7), f"step {step}"
    assert run["summary"]["metrics"][LOSS_KEY] == pytest.approx(reference_run["summary"]["metrics"][LOSS_KEY], rel=1e-6)


# ---------------------------------------------------------------- (b) preemption and hard requeue
@pytest.mark.slurm
def test_b_preemption_by_high_priority_partition(reference_run, tmp_path):
    t0 = time.time()
    cpus = os.cpu_count() or 1
    job, log = submit(tmp_path, "preempt", *PAUSE, cpus=cpus)  # holds the whole node
    run_dir = tmp_path / "runs" / "preempt" / "main"
    wait_for((run_dir / "paused").exists, 300, "training paused two steps past the first periodic checkpoint")
    high = subprocess.run(["sbatch", "--parsable", "--partition=high", "--cpus-per-task=1", "--job-name=high",
                           f"--output={tmp_path / 'high.out'}", "--wrap", "sleep 2"],
                          capture_output=True, text=True, check=True).stdout.strip()
    run = finished_run(tmp_path, "preempt", job, log)
    assert wait_job(high, 30)["JobState"] == "COMPLETED"
    assert int(run["info"]["Restarts"]) >= 1, run["info"]
    assert "received SIGUSR1: checkpoint at step" in run["log"], _tail(log)
    resumed = run["summary"]["resumed_from"]
    assert resumed and Path(resumed).name.startswith("hpc_ckpt_"), resumed  # the preemption checkpoint, not last
    _assert_same_as_reference(run, reference_run)
    print(f"[slurm] preempted + requeued run: {time.time() - t0:.1f} s")


@pytest.mark.slurm
def test_b_hard_requeue_resumes_from_periodic_checkpoint(reference_run, tmp_path):
    t0 = time.time()
    # SIGTERM is left to Lightning (no checkpoint): the job must come back from its last periodic checkpoint.
    job, log = submit(tmp_path, "hard", "++callbacks.preemption.signals=[SIGUSR1]", *PAUSE)
    run_dir = tmp_path / "runs" / "hard" / "main"
    wait_for((run_dir / "paused").exists, 300, "training paused two steps past the first periodic checkpoint")
    subprocess.run(["scontrol", "requeue", job], check=True)
    run = finished_run(tmp_path, "hard", job, log)
    assert int(run["info"]["Restarts"]) >= 1, run["info"]
    assert Path(run["summary"]["resumed_from"]).name == "last.ckpt"
    assert not list((run_dir / "checkpoints").glob("hpc_ckpt_*"))
    steps = logged_steps(run_dir, LOSS_KEY)
    # The requeued attempt redid the steps after last.ckpt and replaced their rows (flexitrain.loggers): each once.
    assert "metrics.csv: replaced" in run["log"], "no step was redone: the requeue did not interrupt training"
    assert steps == sorted(set(steps)), f"a redone step is logged twice: {steps}"
    _assert_same_as_reference(run, reference_run)
    print(f"[slurm] hard-requeued run: {time.time() - t0:.1f} s")


# ---------------------------------------------------------------- (c) multirun through submitit + sweep report
@pytest.mark.slurm
def test_c_submitit_multirun_and_sweep_report(cluster, demo_corpus, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    t0 = time.time()
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "+sweep=smoke", *COMMON, "experiment=sweep2",
           f"paths.root_dir={tmp_path}", "++slurm.partition=debug", "++slurm.gpus_per_node=null",
           "++slurm.tasks_per_node=1", "++slurm.cpus_per_task=1", "++slurm.mem_gb=1", "++slurm.time_min=10"]
    cmd = [c for c in cmd if not c.startswith("trainer.max_steps=")]  # the sweep sets it: 4 and 8
    res = subprocess.run(cmd, cwd=REPO, env=job_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sweep = tmp_path / "runs" / "sweep2" / "sweep_smoke"
    out = tmp_path / "report"
    rep = subprocess.run([sys.executable, "tools/sweep_report.py", str(sweep), "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"finished"}, rows
    assert sorted((int(r["trainer.max_steps"]), int(r["global_step"])) for r in rows) == [(4, 4), (8, 8)]
    assert all(Path(r["run_dir"]).parent == sweep for r in rows)  # run dir = Hydra's trial dir
    assert (out / "sweep.png").stat().st_size > 0
    assert (out / "sweep.md").read_text().count("| finished |") == 2
    print(f"[slurm] 2-trial submitit multirun + report: {time.time() - t0:.1f} s")


# ---------------------------------------------------------------- sweep and launcher configs (default suite)
SWEEPS = sorted(p.stem for p in (REPO / "configs" / "sweep").glob("*.yaml"))


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_config_sweeps_existing_keys(name):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from flexitrain.utils.config import compose

    cfg = compose(["recipe=codec_12hz", f"+sweep={name}", "hydra/launcher=slurm"])
    params = cfg.hydra.sweeper.params
    assert params, name
    parser = OverridesParser.create()
    for key, values in params.items():
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", f"{name}: {key} not in the config"
        swept = list(parser.parse_override(f"{key}={values}").sweep_string_iterator())
        assert len(swept) >= 2, (key, swept)
    # a trial's run directory is Hydra's trial directory (stable across requeues and re-launches)
    assert OmegaConf.to_container(cfg)["run_name"] == f"sweep_{name}/" + "${hydra:job.num}"
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")


def test_slurm_launcher_takes_resources_from_the_slurm_block():
    from flexitrain.utils.config import compose

    cfg = compose(["recipe=codec_demo", "hydra/launcher=slurm", "++slurm.partition=gpu", "++slurm.account=proj",
                   "++slurm.gpus_per_node=4", "++slurm.tasks_per_node=4", "++slurm.time_min=90"])
    launcher = cfg.hydra.launcher
    assert (launcher.partition, launcher.account, launcher.gpus_per_node, launcher.tasks_per_node,
            launcher.timeout_min) == ("gpu", "proj", 4, 4, 90)
    assert launcher.additional_parameters.requeue is True
    bare = compose(["recipe=codec_demo", "hydra/launcher=slurm"]).hydra.launcher  # without a slurm block
    assert (bare.partition, bare.tasks_per_node, bare.timeout_min) == (None, 1, 1440)


# ---------------------------------------------------------------- loader workers under scheduler signals
class _SignalledDataset(torch.utils.data.IterableDataset):
    """Each worker signals itself as SLURM does to every process of a job step, then yields its batches."""

    def __iter__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)
        yield from ({"index": torch.full((2,), i)} for i in range(4))


def test_loader_workers_leave_scheduler_signals_to_the_main_process():
    from flexitrain.data.pipeline import AudioLoader

    batches = list(AudioLoader(_SignalledDataset(), num_workers=1))  # a killed worker would raise here
    assert [int(b["index"][0]) for b in batches] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="killed by signal|exited unexpectedly"):  # the failure the init function prevents
        list(AudioLoader(_SignalledDataset(), num_workers=1, worker_init_fn=None))
