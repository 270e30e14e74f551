"""Training state shared by the four tasks (issue 19): LR schedules, the EMA of weights, per-rank CPU + CUDA RNG
states in checkpoints. Tiny models, no subprocess; the end-to-end exact resume with EMA on is
tests/test_codec_training_runs.py::test_killed_and_resumed_run_reproduces_the_uninterrupted_run."""
from __future__ import annotations

import io
import math
import random
from dataclasses import asdict

import lightning as L
import pytest
import torch
from torch import nn

from flexitrain.tasks.ema import ModelEMA, ema_config
from flexitrain.tasks.schedules import SCHEDULES, lr_lambda, warmup_cosine

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ LR schedules
def test_default_schedule_is_the_old_warmup_cosine():
    cfg = {"warmup_steps": 5, "total_steps": 50, "min_lr_ratio": 0.2}
    old = warmup_cosine(5, 50, 0.2)
    for f in (lr_lambda(cfg), lr_lambda({**cfg, "name": "cosine"}), lr_lambda({**cfg, "name": "warmup_cosine"})):
        assert [f(s) for s in range(60)] == [old(s) for s in range(60)]
    # the tasks' defaults (no scheduler config): constant 1
    assert [lr_lambda({"warmup_steps": 0, "total_steps": 1, "min_lr_ratio": 1.0})(s) for s in (0, 5, 99)] == [1.0] * 3


@pytest.mark.parametrize("name,expected", [
    # warm-up 4 steps (0.25, 0.5, 0.75, 1), then 10 steps of decay to min_lr_ratio 0.1 at step 14
    ("cosine", {0: 0.25, 3: 1.0, 4: 1.0, 9: 0.55, 14: 0.1, 40: 0.1}),
    ("constant", {0: 0.25, 3: 1.0, 4: 1.0, 9: 1.0, 14: 1.0, 40: 1.0}),
    ("linear", {0: 0.25, 3: 1.0, 4: 1.0, 9: 0.55, 11: 0.37, 14: 0.1, 40: 0.1}),
    ("polynomial", {0: 0.25, 4: 1.0, 9: 0.1 + 0.9 * 0.25, 14: 0.1, 40: 0.1}),          # power 2
    ("exponential", {0: 0.25, 4: 1.0, 5: 0.5, 6: 0.25, 7: 0.125, 40: 0.1}),              # gamma 0.5, floor 0.1
    ("inverse_sqrt", {0: 0.25, 3: 1.0, 4: math.sqrt(4 / 5), 15: 0.5, 99: 0.2, 1000: 0.1}),  # sqrt(4/(step+1))
])
def test_schedule_values(name, expected):
    f = lr_lambda({"name": name, "warmup_steps": 4, "total_steps": 14, "min_lr_ratio": 0.1, "gamma": 0.5,
                   "power": 2.0})
    got = {s: f(s) for s in expected}
    assert got == pytest.approx(expected, abs=1e-12), got


def test_schedules_without_warmup_and_dac_default():
    assert lr_lambda({"name": "inverse_sqrt", "min_lr_ratio": 0.0})(3) == pytest.approx(0.5)  # 1/sqrt(step+1)
    dac = lr_lambda({"name": "exponential", "min_lr_ratio": 0.0})  # DAC's ExponentialLR(gamma=0.999996)
    assert dac(0) == 1.0 and dac(100_000) == pytest.approx(0.999996 ** 100_000)
    lin = lr_lambda({"name": "linear", "warmup_steps": 0, "total_steps": 10, "min_lr_ratio": 0.0})
    assert [lin(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert set(SCHEDULES) == {"cosine", "constant", "linear", "polynomial", "exponential", "inverse_sqrt"}


def test_schedule_config_errors_name_the_key():
    with pytest.raises(ValueError, match="task.scheduler.name='step'.*choose one of"):
        lr_lambda({"name": "step"})
    with pytest.raises(ValueError, match="unknown keys.*warmup"):
        lr_lambda({"warmup": 10})
    with pytest.raises(ValueError, match="gamma"):
        lr_lambda({"name": "exponential", "gamma": 1.5})


def test_every_task_builds_its_scheduler_from_the_name():
    from flexitrain.tasks.vocos import VocosTask
    from flexitrain.models.vocos import TINY_VOCOS

    task = VocosTask(model=TINY_VOCOS, sample_rate=24000,
                     scheduler={"name": "exponential", "gamma": 0.5, "min_lr_ratio": 0.0})
    (opt_g, _), (sched_g, sched_d) = task.configure_optimizers()
    for _ in range(2):
        opt_g.step()
        sched_g.step()
    assert sched_g.get_last_lr()[0] == pytest.approx(task.optim_cfg["lr"] * 0.25)


# ------------------------------------------------------------------------------------------------ EMA
def test_ema_math_copy_phase_every_and_no_host_sync():
    from flexitrain.utils.dispatch_count import SyncCounter

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema = ModelEMA(net, decay=0.75, start_step=2, every=2)
    expect = None
    for step in range(1, 8):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        live = [p.detach().clone() for p in net.parameters()]
        with SyncCounter() as counter:
            ema.update()
        assert counter.syncs == 0, counter.sites
        if step <= 2:        # copy phase
            expect = live
        elif step % 2 == 0:  # every 2nd step
            expect = [0.75 * e + 0.25 * w for e, w in zip(expect, live)]
        for s, e in zip(ema.shadow, expect):
            torch.testing.assert_close(s, e, rtol=0, atol=1e-6)
    assert ema.num_updates == 7


def test_ema_is_fp32_on_the_device_and_swaps_exactly():
    net = nn.Linear(4, 4).to(torch.bfloat16)
    ema = ModelEMA(net, decay=0.5)
    ema.update()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()
    assert all(s.dtype == torch.float32 and s.device == net.weight.device for s in ema.shadow)
    live = {k: v.clone() for k, v in net.state_dict().items()}
    shadow = [s.clone() for s in ema.shadow]
    with ema.swapped_in():
        assert torch.equal(net.weight, shadow[0].to(torch.bfloat16))
        with pytest.raises(RuntimeError, match="swapped in"):
            ema.update()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in live.items())  # live weights back, bit-exact
    assert all(torch.equal(a, b) for a, b in zip(shadow, ema.shadow))        # EMA untouched (no bf16 rounding)


def test_ema_state_round_trip_and_mismatches():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema = ModelEMA(net, decay=0.9, start_step=0)
    for _ in range(3):
        with torch.no_grad():
            net[0].weight.mul_(1.1)
        ema.update()
    buf = io.BytesIO()
    torch.save({"ema": ema.state_dict()}, buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["ema"]  # plain containers and tensors
    other = ModelEMA(net, decay=0.9)
    other.load_state_dict(state)
    assert other.num_updates == 3 and all(torch.equal(a, b) for a, b in zip(ema.shadow, other.shadow))
    bad = {**state, "weights": {**state["weights"], "0.weight": torch.zeros(5, 3), "extra": torch.zeros(1)}}
    del bad["weights"]["1.bias"]
    problems = other.check_state(bad)
    assert any(p.startswith("shape: ema.0.weight") for p in problems)
    assert "unexpected: ema.extra" in problems and any(p.startswith("missing: ema.1.bias") for p in problems)
    with pytest.raises(ValueError, match="does not fit"):
        other.load_state_dict(bad)


def test_ema_config_is_checked():
    assert ema_config(None) is None and ema_config({"enabled": False, "decay": 0.9}) is None
    assert ema_config({"decay": 0.99}) == {"decay": 0.99, "start_step": 0, "every": 1}
    with pytest.raises(ValueError, match="decay"):
        ema_config({"decay": 1.0})
    with pytest.raises(ValueError, match="unknown keys"):
        ema_config({"decay": 0.9, "beta": 0.9})


def _vocos_task(**kw):
    from flexitrain.models.vocos import TINY_VOCOS
    from flexitrain.tasks.vocos import VocosTask

    small = dict(discriminator={"periods": [], "fft_sizes": [256], "channels": 4},
                 mel_loss={"window_lengths": [256, 1024], "n_mels": [40, 80]})
    torch.manual_seed(0)
    return VocosTask(model={**TINY_VOCOS, "dim": 16, "intermediate_dim": 32, "num_layers": 1}, sample_rate=24000,
                     disc_start_step=0, **small, **kw)


def _tones(n: int = 9600) -> dict:
    t = torch.arange(n) / 24000
    audio = torch.stack([torch.sin(2 * math.pi * 150 * t), torch.sin(2 * math.pi * 230 * t)]) * 0.2
    return {"audio": audio[:, None].float(), "lengths": torch.tensor([n, n - 2400])}


class _Probe(L.Callback):
    """Records whether validation sees the EMA weights, and saves a checkpoint at on_validation_end as
    ModelCheckpoint does (before the task's own hook swaps the live weights back)."""

    def __init__(self, path):
        self.path, self.seen = path, []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        ema = pl_module.ema
        self.seen.append(all(torch.equal(p.float(), s) for p, s in zip(ema._params, ema.shadow)))

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)


def test_gan_task_validates_and_exports_ema_weights_and_checkpoints_the_live_ones(tmp_path):
    from flexitrain.models.vocos import Vocos
    from flexitrain.tasks.checkpointing import check_task_checkpoint, load_task
    from flexitrain.tasks.vocos import VocosTask
    from flexitrain.utils.safe_load import WrongCheckpointError

    task = _vocos_task(ema={"decay": 0.5, "start_step": 1, "every": 1})
    probe = _Probe(tmp_path / "val.ckpt")
    batch = _tones()
    trainer = L.Trainer(max_steps=2, max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, val_check_interval=2, callbacks=[probe],
                        default_root_dir=str(tmp_path))  # no logger: validation audio goes to tmp_path/samples
    loader = torch.utils.data.DataLoader([batch] * 2, batch_size=None)
    trainer.fit(task, loader, torch.utils.data.DataLoader([batch], batch_size=None))
    ema = task.ema
    assert ema.num_updates == 2 and not ema.swapped and probe.seen == [True]
    live = {k: v.clone() for k, v in task.generator.state_dict().items()}
    averaged = dict(zip(ema.names, ema.shadow))
    assert any(not torch.equal(live[n], averaged[n]) for n in ema.names)  # the average differs from the weights

    ckpt = torch.load(tmp_path / "val.ckpt", weights_only=True)  # written while the EMA was swapped in
    assert all(torch.equal(ckpt["state_dict"][f"generator.{k}"], v) for k, v in live.items())
    assert all(torch.equal(ckpt["ema"]["weights"][n], averaged[n]) for n in ema.names)
    assert ckpt["ema"]["num_updates"] == 2 and ckpt["rng_states"]["world_size"] == 1
    assert list((tmp_path / "samples").glob("step_*/val_audio__0.wav"))  # Vocos audio without a logger

    # resume: the EMA comes back exactly; inference loaders and exports use the average
    resumed = load_task(VocosTask, tmp_path / "val.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema.shadow, ema.shadow)) and resumed.ema.num_updates == 2
    assert all(torch.equal(resumed.generator.state_dict()[k], v) for k, v in live.items())
    for model in (load_task(VocosTask, tmp_path / "val.ckpt", use_ema=True).generator,):
        assert all(torch.equal(model.state_dict()[n], averaged[n]) for n in ema.names)
    task.export_model(str(tmp_path / "export"))
    exported = Vocos.from_pretrained(tmp_path / "export")
    assert all(torch.equal(exported.state_dict()[n], averaged[n]) for n in ema.names)
    assert all(torch.equal(task.generator.state_dict()[k], v) for k, v in live.items())  # swapped back

    # a checkpoint whose EMA does not fit is refused with the key named, before anything loads
    name = ema.names[-1]
    ckpt["ema"]["weights"][name] = torch.zeros(3, 3)
    with pytest.raises(WrongCheckpointError, match=f"shape: ema.{name}"):
        check_task_checkpoint(resumed, ckpt, tmp_path / "val.ckpt")


def _voicebox_batch() -> dict:
    """Two 0.64-s tones with random semantic codes (a Voicebox training batch of the tiny config)."""
    g = torch.Generator().manual_seed(0)
    n = 10240
    t = torch.arange(n) / 16000
    return {"audio": (0.2 * torch.sin(2 * math.pi * 200 * t)).repeat(2, 1)[:, None],
            "lengths": torch.tensor([n, n]), "semantic_codes": torch.randint(0, 64, (2, 8), generator=g)}


def test_automatic_optimisation_tasks_average_once_per_optimizer_step():
    """AR-TTS and Voicebox (automatic optimisation): one EMA update per optimiser step, not per micro-batch."""
    from flexitrain.models.tts.voicebox import TINY_CONFIG
    from flexitrain.tasks.voicebox import VoiceboxTask

    batch = _voicebox_batch()
    task = VoiceboxTask(model={**asdict(TINY_CONFIG), "use_repa": False}, use_repa=False,
                        ema={"decay": 0.9, "start_step": 0})
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2)
    trainer.fit(task, torch.utils.data.DataLoader([batch] * 4, batch_size=None))
    assert trainer.global_step == 2 and task.ema.num_updates == 2


# ------------------------------------------------------------------------------------------------ RNG states
def _four_tasks():
    from hydra.utils import instantiate

    from codec_fixtures import MICRO_MODEL, MICRO_TASK
    from flexitrain.models.tts.voicebox import TINY_CONFIG
    from flexitrain.tasks.ar_tts import ARTTSTask
    from flexitrain.tasks.voicebox import VoiceboxTask
    from flexitrain.utils.config import compose

    ar_model = dict(text_token_size=100, speech_token_size=50, text_encoder_dim=16, text_encoder_heads=2,
                    text_encoder_ffn=32, text_encoder_blocks=1, llm_dim=16, llm_heads=2, llm_ffn=32, llm_blocks=1,
                    spk_embed_dim=8)
    ema = {"decay": 0.9}
    return {
        "CodecTask": lambda: instantiate(compose([*MICRO_MODEL, *MICRO_TASK, "task.ema={decay:0.9}"]).task,
                                         _recursive_=False),
        "VocosTask": lambda: _vocos_task(ema=ema),
        "VoiceboxTask": lambda: VoiceboxTask(model={**asdict(TINY_CONFIG), "use_repa": False}, use_repa=False,
                                             ema=ema),
        "ARTTSTask": lambda: ARTTSTask(ar_model, ema=ema),
    }


class FakeCuda:
    """Two CUDA devices whose generator states are recorded (CPU-only machines)."""

    def __init__(self, monkeypatch):
        self.states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
        self.restored: list = []
        for name, fn in {"is_available": lambda: True, "is_initialized": lambda: True, "device_count": lambda: 2,
                         "get_rng_state_all": lambda: [s.clone() for s in self.states],
                         "set_rng_state_all": lambda states: self.restored.append([s.clone() for s in states]),
                         "set_rng_state": lambda s, device=0: self.restored.append((device, s.clone()))}.items():
            monkeypatch.setattr(torch.cuda, name, fn)


def test_every_task_checkpoints_and_restores_cuda_rng_states(monkeypatch):
    tasks = {name: make() for name, make in _four_tasks().items()}  # built before CUDA is faked
    cuda = FakeCuda(monkeypatch)
    for name, task in tasks.items():
        ckpt = {"state_dict": task.state_dict()}
        task.on_save_checkpoint(ckpt)
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)  # plain tensors and containers
        assert ckpt["flexitrain_task"] == name
        bundle = ckpt["rng_states"]["ranks"][0]
        assert [s.tolist() for s in bundle["cuda"]] == [s.tolist() for s in cuda.states], name
        assert torch.equal(bundle["torch"], torch.get_rng_state())
        assert set(ckpt["ema"]["weights"]) == set(task.ema.names), name

        cpu_state = torch.get_rng_state()
        torch.rand(5)  # the stream moves on; the resume must put it (and CUDA's) back
        cuda.restored.clear()
        task.on_load_checkpoint(ckpt)
        assert cuda.restored == [], "CUDA states are restored at the first training batch, not at load"
        task.on_train_batch_start(None, 0)
        assert torch.equal(torch.get_rng_state(), cpu_state), name
        assert len(cuda.restored) == 1 and [s.tolist() for s in cuda.restored[0]] == [s.tolist() for s in cuda.states]


def test_cuda_states_of_another_device_count_and_validation_isolation(monkeypatch):
    from flexitrain.tasks.training_state import capture_global_rng, restore_global_rng

    cuda = FakeCuda(monkeypatch)
    state = capture_global_rng()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # resumed on a machine with one GPU
    restore_global_rng(state)
    assert len(cuda.restored) == 1 and cuda.restored[0][0] == 0 and torch.equal(cuda.restored[0][1], cuda.states[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # ... or on CPU: skipped
    cuda.restored.clear()
    restore_global_rng(state)
    assert cuda.restored == []


def test_each_rank_resumes_its_own_streams(monkeypatch):
    """Under DDP every rank's bundle is gathered into the checkpoint; rank r restores bundle r."""
    from flexitrain.models.tts.voicebox import TINY_CONFIG
    from flexitrain.tasks import training_state
    from flexitrain.tasks.voicebox import VoiceboxTask

    ranks = []
    for r in range(2):
        task = VoiceboxTask(model={**asdict(TINY_CONFIG), "use_repa": False}, use_repa=False)
        task._rng, task._gen = random.Random(r), torch.Generator().manual_seed(100 + r)
        ranks.append(task._rng_bundle())
    monkeypatch.setattr(training_state, "gather_per_rank", lambda obj: ranks)
    ckpt = {}
    task.on_save_checkpoint(ckpt)
    assert ckpt["rng_states"]["world_size"] == 2
    for r in range(2):
        monkeypatch.setattr(training_state, "_dist_world", lambda r=r: (r, 2))
        fresh = VoiceboxTask(model={**asdict(TINY_CONFIG), "use_repa": False}, use_repa=False)
        fresh.on_load_checkpoint(ckpt)
        assert fresh._rng.random() == random.Random(r).random()
        expected = torch.rand(3, generator=torch.Generator().manual_seed(100 + r))
        assert torch.equal(torch.rand(3, generator=fresh._gen), expected)


# ------------------------------------------------------------------------------------------------ samples
def test_voicebox_validation_logs_its_sample_as_image_and_audio(tmp_path):
    """No logger: the prompt-infilled mel (image) and, with validation.vocoder, its audio land in the run dir."""
    from flexitrain.models.tts.voicebox import TINY_CONFIG
    from flexitrain.tasks.voicebox import VoiceboxTask

    voc = _vocos_task()
    voc.export_model(str(tmp_path / "vocoder"))
    batch = _voicebox_batch()
    task = VoiceboxTask(model={**asdict(TINY_CONFIG), "use_repa": False}, use_repa=False,
                        validation={"n_timesteps": 2, "vocoder": str(tmp_path / "vocoder")})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path / "run"))
    trainer.validate(task, torch.utils.data.DataLoader([batch], batch_size=None))
    out = tmp_path / "run" / "samples" / "step_00000000"
    import soundfile as sf
    from PIL import Image

    wav, sr = sf.read(out / "val_audio__sample.wav")
    assert sr == 24000 and len(wav) == 32 * 480 and (out / "val_audio__target.wav").is_file()  # 32 mel frames
    img = Image.open(out / "val_mel__sample_over_target.png")
    assert img.size == (32, 2 * TINY_CONFIG.mel_dim)


def test_media_go_to_tensorboard_and_wandb_else_to_files(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.loggers import TensorBoardLogger

    from flexitrain.utils.media_log import log_media, mel_image

    clip, img = torch.zeros(1600), mel_image(torch.rand(8, 20))
    assert img.shape == (8, 20, 3) and img.dtype.name == "uint8"
    tb = TensorBoardLogger(str(tmp_path / "tb"))
    trainer = SimpleNamespace(is_global_zero=True, loggers=[tb], default_root_dir=str(tmp_path), global_step=3)
    assert log_media(trainer, audio={"a/x": clip}, images={"i/x": img}, text={"t/x": "hi"}) == ["tensorboard"]
    tb.experiment.flush()
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))

    logged = []

    class WandbLogger:  # the real wandb.Audio / wandb.Image objects, a recording run
        experiment = SimpleNamespace(log=lambda payload: logged.append(payload))

    trainer.loggers = [WandbLogger()]
    assert log_media(trainer, audio={"a/x": clip}, sample_rate=16000, images={"i/x": img}) == ["wandb"]
    assert set(logged[0]) == {"a/x", "i/x", "trainer/global_step"} and logged[0]["trainer/global_step"] == 3

    trainer.loggers = []  # logger=none / csv: files in the run directory
    where = log_media(trainer, audio={"a/x": clip}, images={"i/x": img}, text={"t/x": "hi"}, step=7)
    out = tmp_path / "samples" / "step_00000007"
    assert where == [str(out)] and sorted(p.name for p in out.iterdir()) == ["a__x.wav", "i__x.png", "t__x.txt"]
    trainer.is_global_zero = False
    assert log_media(trainer, audio={"a/x": clip}) == []
