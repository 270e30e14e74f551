"""0 host-device syncs in the steady-state CodecTask GAN step (issue 13), enforced on CPU.

On CPU nothing waits for a device, so `flexitrain.utils.dispatch_count.SyncCounter` (``cpu_as_device=True``)
counts every host read of a tensor's value as a sync: on a GPU each ``.item()``, ``.tolist()``, ``bool(t)``,
``int(t)``, or op whose output size depends on the data (``nonzero``, boolean-mask indexing) blocks the CPU until
the GPU has caught up. Also here: the non-finite step guard still skips on CPU, and the training losses of a few
steps equal those recorded before the sync removal (float rounding aside).
"""
from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from codec_fixtures import MICRO_MODEL, MICRO_TASK
from test_codec_task import speechlike_batch
from flexitrain.utils.config import compose
from flexitrain.utils.dispatch_count import SyncCounter

pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_KEYS = ("loss_mel", "loss_commit", "loss_codebook", "loss_distill", "loss_adv", "loss_feat", "loss_d", "loss_g",
             "tokens_per_second")
# Per-step values of LOSS_KEYS recorded with the code before the syncs were removed (commit a1e2d51, one thread):
# codec_demo (random 2-block teacher, GAN from step 0), 4 steps of speech_batch(2, 0.64 s, seed=i) ...
DEMO_REFERENCE = [
    (10.12491, 1.376682, 1.376682, 0.9883729, 6.0683508, 13.63917, 6.0922632, 201.76683, 12.86765),
    (9.7374811, 0.8433293, 0.8433293, 0.8666909, 6.0447736, 13.77706, 6.0835161, 193.71562, 1.8382351),
    (6.3553696, 1.5208923, 1.5208923, 0.9202505, 6.0116897, 13.26615, 6.0598454, 143.57941, 4.5955882),
    (4.9478955, 0.74404, 0.74404, 0.9863979, 5.9686751, 12.39077, 6.0227103, 120.69466, 12.86765),
]
# ... and the micro model of tests/codec_fixtures.py, 5 steps of speech_batch(3, 0.48 s, seed=i).
MICRO_REFERENCE = [
    (9.5432863, 1.1691835, 1.1691835, 1.0421655, 2.1332648, 2.6284842, 2.1442883, 167.6335, 12.34568),
    (5.4839168, 1.9366658, 1.9366658, 0.9603627, 2.1208079, 2.8638339, 2.1376946, 106.93351, 2.3148148),
    (6.9886584, 1.2705679, 1.270568, 1.0739899, 2.107836, 3.1486053, 2.1249321, 130.93298, 3.8580246),
    (6.349659, 1.3684547, 1.3684546, 1.0406046, 2.0955732, 3.4279556, 2.1122584, 121.51601, 12.34568),
    (7.0772672, 1.1704184, 1.1704184, 0.9337137, 2.0839977, 3.3102961, 2.0998726, 130.33232, 3.0864198),
]
# Float rounding only: fused AdamW, masked (all-ones) paths, padded group axis; measured drift <= 2e-6.
RTOL = 2e-4


class CountSteps(L.Callback):
    """Counts host syncs over the steps ``steps`` (batch indices): from ``on_train_batch_start`` to
    ``on_train_batch_end``, i.e. ``training_step`` with its optimiser steps and Lightning's logging, plus what a
    progress bar reads after every batch. The batch transfer (before ``on_train_batch_start``) is not counted:
    the host-side batch check in ``CodecTask.on_before_batch_transfer`` reads host memory, not the device."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.per_step: dict[int, SyncCounter] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx in self.steps:
            self.per_step[batch_idx] = SyncCounter().__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        counter = self.per_step.get(batch_idx)
        if counter is not None and counter._modes:
            trainer.progress_bar_metrics  # what a progress bar reads after every batch  # noqa: B018
            counter.__exit__(None, None, None)


def speech_batch(batch: int, seconds: float, sr: int = 16000, seed: int = 0, ragged: bool = True) -> dict:
    b = speechlike_batch(batch, seconds, sr, seed)
    audio, lengths = b["audio"], b["lengths"]
    if ragged and batch > 1:  # the last item is shorter (its padding zeroed, as the collate does)
        lengths[-1] = int(0.7 * audio.shape[-1])
        audio[-1, :, lengths[-1]:] = 0
    return {"audio": audio, "lengths": lengths}


class RecordLosses(L.Callback):
    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k[len("train/"):]: float(v) for k, v in trainer.callback_metrics.items()
                           if k.startswith("train/")})


def fit_counting(task, batches, count_steps=(), **trainer_kw):
    """``trainer.fit`` over ``batches`` (one step each) counting host syncs in ``count_steps``; returns
    (trainer, CountSteps, RecordLosses). The losses are read after the counted window."""
    counter, record = CountSteps(count_steps), RecordLosses()
    kw = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, max_steps=len(batches), max_epochs=1)
    kw.update(trainer_kw)
    trainer = L.Trainer(callbacks=[counter, record], **kw)
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    return trainer, counter, record


def make_task(*overrides: str):
    cfg = compose(list(overrides))
    torch.manual_seed(0)
    return instantiate(cfg.task, _recursive_=False)


def demo_task(*extra: str):
    """The codec_demo recipe's CodecTask (its random 2-block teacher), GAN terms from the first step."""
    return make_task("recipe=codec_demo", "task.teacher.model_dir=null", "task.teacher.random_init=true",
                     "task.teacher.num_blocks=2", "task.disc_start_step=0", *extra)


def assert_losses_match(steps: list[dict], reference: list[tuple]) -> None:
    assert len(steps) == len(reference)
    for i, (got, want) in enumerate(zip(steps, reference)):
        for key, value in zip(LOSS_KEYS, want):
            assert got[key] == pytest.approx(value, rel=RTOL, abs=1e-6), (i, key, got[key], value)


# ---------------------------------------------------------------------------------------------------------------
def test_codec_demo_steady_state_step_makes_no_host_sync(tmp_path):
    """Steps 3 and 4 of codec_demo (D step, G step, logging to a CSV logger between its writes, progress-bar
    read) dispatch no host sync, and the losses equal those recorded before the syncs were removed."""
    task = demo_task()
    batches = [speech_batch(2, 0.64, seed=i) for i in range(4)]  # ragged: the second item is 0.7 x as long
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer, counter, record = fit_counting(task, batches, count_steps=(2, 3), logger=logger, log_every_n_steps=50,
                                            enable_progress_bar=True)
    assert trainer.global_step == 4 and int(task.skipped_steps) == 0
    for step, c in sorted(counter.per_step.items()):
        assert c.ops > 1000, c.report()  # the counter saw the step
        assert c.syncs == 0, f"step {step}: {c.report()}"
    assert_losses_match(record.steps, DEMO_REFERENCE)


def test_micro_model_losses_unchanged_and_bypass_step_has_no_sync():
    task = make_task(*MICRO_MODEL, *MICRO_TASK)
    batches = [speech_batch(3, 0.48, seed=i) for i in range(5)]
    _, counter, record = fit_counting(task, batches, count_steps=(3,))
    assert counter.per_step[3].syncs == 0, counter.per_step[3].report()
    assert_losses_match(record.steps, MICRO_REFERENCE)
    # The semantic-only (RVQ bypassed) step takes another branch: no sync there either.
    task = make_task(*MICRO_MODEL, *MICRO_TASK, "task.bypass_quantize_prob=1.0")
    _, counter, record = fit_counting(task, batches[:3], count_steps=(2,))
    assert record.steps[-1]["loss_commit"] == 0  # bypassed
    assert counter.per_step[2].syncs == 0, counter.per_step[2].report()


def test_non_finite_step_is_skipped_on_the_device():
    """loss = NaN: no parameter or optimiser state changes, skipped_steps counts it — decided without a sync."""
    task = make_task(*MICRO_MODEL, *MICRO_TASK, "task.disc_start_step=1000")  # generator only: one guarded step
    good = speech_batch(3, 0.48, seed=0)
    bad = copy.deepcopy(good)
    bad["audio"][0, 0, 100] = float("nan")
    trainer, counter, record = fit_counting(task, [good, bad, good], count_steps=(1,))
    assert record.steps[1]["loss_g"] != record.steps[1]["loss_g"]  # NaN: the step's loss was not finite
    assert counter.per_step[1].syncs == 0, counter.per_step[1].report()
    assert int(task.skipped_steps) == 1
    assert record.steps[1]["skipped_steps"] == 1 and record.steps[2]["skipped_steps"] == 1
    # The generator optimiser applied 2 of its 3 steps (Adam's step count skips the NaN step), while the LR schedule
    # and global_step count all 3 (the guard's semantics, as for AMP-skipped steps).
    opt_g = trainer.optimizers[0]
    assert all(float(s["step"]) == 2 for s in opt_g.state.values())
    assert trainer.global_step == 3 and trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3

    # The skipped step itself leaves every parameter and the optimiser state untouched.
    task = make_task(*MICRO_MODEL, *MICRO_TASK, "task.disc_start_step=1000")
    before = copy.deepcopy(task.state_dict())
    trainer, _, _ = fit_counting(task, [bad])
    after = task.state_dict()
    assert int(after["skipped_steps"]) == 1
    for k, v in before.items():
        if k != "skipped_steps":
            assert torch.equal(v, after[k]), f"{k} changed after a non-finite step"
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in trainer.optimizers[0].state.values())


def test_batch_lengths_are_checked_on_the_host():
    """The step trusts the lengths (no host read); `on_before_batch_transfer` rejects bad ones first."""
    task = make_task(*MICRO_MODEL, *MICRO_TASK)
    ok = speech_batch(2, 0.1)
    task.check_batch(ok)
    short = dict(ok, lengths=torch.tensor([1600, 399]))  # under one 25-ms teacher frame
    with pytest.raises(ValueError, match=r"lengths must lie in \[400, 1600\]"):
        task.on_before_batch_transfer(short, 0)
    with pytest.raises(ValueError, match="lengths must lie"):
        task.check_batch(dict(ok, lengths=torch.tensor([1601, 800])))
    with pytest.raises(ValueError, match="shape"):
        task.check_batch(dict(ok, lengths=torch.tensor([1600])))


def test_static_group_axis_matches_the_compact_layout():
    """Training pads the group axis to T (no host read of the group count): same groups, same VQ losses."""
    from flexitrain.models.codec.merging import group_frames
    from flexitrain.models.codec.rvq import ResidualVectorQuantize

    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 16, 12, generator=g).cumsum(-1)  # smooth: neighbours merge
    lengths = torch.tensor([12, 9, 5])
    tau = torch.tensor([0.9, 0.95, 0.8])
    compact = group_frames(h, tau, 4, lengths, mask_padding=True)
    static = group_frames(h, tau, 4, lengths, mask_padding=True, static_groups=True)
    G = compact.alignment.shape[1]
    assert static.alignment.shape[1] == 12 > G and int(static.compact_groups) == G
    assert torch.equal(static.alignment[:, :G], compact.alignment) and not static.alignment[:, G:].any()
    assert torch.equal(static.num_groups, compact.num_groups) and torch.equal(static.frame_to_group, compact.frame_to_group)
    assert torch.equal(static.group_mask[:, :G], compact.group_mask) and not static.group_mask[:, G:].any()

    rvq = ResidualVectorQuantize(input_dim=16, n_codebooks=3, codebook_size=8, codebook_dim=4)
    z = torch.randn(3, 16, 12, generator=g)
    a = rvq(z[..., :G], 3)
    b = rvq(z, 3, loss_mask=torch.arange(12) < static.compact_groups)
    torch.testing.assert_close(b.commitment_loss, a.commitment_loss)
    torch.testing.assert_close(b.codebook_loss, a.codebook_loss)
    assert torch.equal(b.codes[..., :G], a.codes)
