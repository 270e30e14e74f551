"""flexitrain-export / flexitrain-average (flexitrain/export.py) on tiny checkpoints of the four tasks.

Each task checkpoint is written the way Trainer.save_checkpoint writes it (the task's own on_save_checkpoint),
with EMA weights that differ from the live ones, and with hyper-parameters that point the frozen codec / teacher
at paths that do not exist (the export must not need them).
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import torch

from flexitrain.export import average_main, export_main

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")]

MISSING = "/nonexistent/flexitrain-export-test"
EMA = {"decay": 0.5, "start_step": 0, "every": 1}


# ------------------------------------------------------------------------------------------------ tiny tasks
def build_codec(ema):
    from hydra.utils import instantiate

    from codec_fixtures import MICRO_MODEL, MICRO_TASK
    from flexitrain.utils.config import compose

    cfg = compose([*MICRO_MODEL, *MICRO_TASK])
    cfg.task.ema = ema
    return instantiate(cfg.task, _recursive_=False)


def build_vocos(ema, num_layers: int = 1):
    from flexitrain.tasks.vocos import VocosTask

    return VocosTask(model={"dim": 32, "intermediate_dim": 64, "num_layers": num_layers}, sample_rate=16000,
                     discriminator={"periods": [2], "fft_sizes": [512], "channels": 4}, ema=ema)


def build_voicebox(ema):
    from flexitrain.models.tts.voicebox import TINY_CONFIG
    from flexitrain.tasks.voicebox import VoiceboxTask

    return VoiceboxTask(asdict(TINY_CONFIG), ema=ema)


def build_ar(ema):
    from flexitrain.models.tts.ar_tts import tiny_config
    from flexitrain.tasks.ar_tts import ARTTSTask

    return ARTTSTask(tiny_config(), ema=ema)


BUILD = {"codec": build_codec, "vocos": build_vocos, "voicebox": build_voicebox, "ar": build_ar}
MODULE = {"codec": "generator", "vocos": "generator", "voicebox": "nar", "ar": "model"}  # what is exported


def unreachable_frozen_models(kind: str, hparams: dict) -> dict:
    """Hyper-parameters as on a training machine whose codec / teacher files this machine does not have."""
    hp = copy.deepcopy(hparams)
    if kind == "codec":
        hp["teacher"] = {"name": "sensevoice", "model_dir": MISSING}
    elif kind == "voicebox":
        hp["codec"] = {"checkpoint": MISSING}
        hp["teacher"] = {"model_dir": MISSING}
    elif kind == "ar":
        hp["targets"] = {**(hp.get("targets") or {}), "source": "codec", "codec_ckpt": MISSING}
    return hp


def save_checkpoint(task, path: Path, kind: str) -> Path:
    """What Trainer.save_checkpoint writes (plus an optimiser state, which averaging must drop)."""
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "epoch": 0, "global_step": 7,
            "pytorch-lightning_version": L.__version__,
            "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []}]}
    task.on_save_checkpoint(ckpt)
    ckpt["hyper_parameters"] = unreachable_frozen_models(kind, ckpt["hyper_parameters"])
    torch.save(ckpt, path)
    return path


@torch.no_grad()
def make_task(kind: str, seed: int = 0, ema: dict | None = EMA, **kw):
    """A tiny task whose EMA weights (when on) differ from its live weights."""
    torch.manual_seed(seed)
    task = BUILD[kind](ema, **kw)
    if task.ema is not None:
        task.ema_update()  # the average starts as a copy of the weights ...
        for p in getattr(task, MODULE[kind]).parameters():
            p.add_(0.02 * torch.randn_like(p))  # ... which then move away from it
    return task.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    tasks = {kind: make_task(kind) for kind in BUILD}
    return {kind: (task, save_checkpoint(task, root / f"{kind}.ckpt", kind)) for kind, task in tasks.items()}


# ------------------------------------------------------------------------------------------------ model outputs
def loader(kind: str):
    if kind == "codec":
        from flexitrain.models.codec import FlexiCodec
        return FlexiCodec.from_pretrained
    if kind == "vocos":
        from flexitrain.models.vocos import Vocos
        return Vocos.from_pretrained
    if kind == "voicebox":
        from flexitrain.models.tts.voicebox import VoiceboxNAR
        return VoiceboxNAR.from_pretrained
    from flexitrain.models.tts.ar_checkpoint import load_pretrained
    return load_pretrained


@torch.no_grad()
def run_model(kind: str, model) -> torch.Tensor:
    """One deterministic forward pass of the exported model type."""
    g = torch.Generator().manual_seed(5)
    model.eval()
    if kind == "codec":
        wav = 0.1 * torch.randn(1, 12800, generator=g)
        sem = torch.cumsum(torch.randn(1, model.ssl_dim, 13, generator=g), dim=2) * 0.3
        tokens = model.encode(wav, threshold=0.91, num_quantizers=3, semantic_features=sem)
        return model.decode(tokens).audio
    if kind == "vocos":
        return model(torch.randn(1, model.input_channels, 12, generator=g))
    if kind == "voicebox":
        vb = model.voicebox_model
        cond = vb.embed_codes(torch.randint(0, vb.cond_codebook_size, (1, 5), generator=g))
        x_t = torch.randn(1, cond.shape[1], model.mel_dim, generator=g)
        return vb(x_t, torch.tensor([0.3]), cond)
    text = torch.randint(1, 100, (1, 6), generator=g)
    speech = torch.randint(0, model.speech_token_size, (1, 4), generator=g)
    durations = torch.randint(1, model.duration_classes, (1, 4), generator=g)
    out = model(text, torch.tensor([6]), speech, torch.tensor([4]), durations, framerate=0.91)
    return out.lm_output


def weights_of(task, kind: str, ema: bool) -> dict[str, torch.Tensor]:
    module = getattr(task, MODULE[kind])
    with (task.ema_weights() if ema else torch.no_grad()):
        state = module.codec_state_dict() if kind == "codec" else module.state_dict()
        return {k: v.detach().clone() for k, v in state.items()}


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("kind", list(BUILD))
def test_export_writes_the_ema_model_that_from_pretrained_loads(kind, checkpoints, tmp_path, capsys):
    task, ckpt = checkpoints[kind]
    out = tmp_path / "export"
    assert export_main([str(ckpt), str(out)]) == 0
    assert "EMA weights" in capsys.readouterr().out
    model = loader(kind)(out)
    if kind != "codec":  # the TTS CLI's loaders take the folder too (no frozen codec comes with it)
        from flexitrain.tts import loading

        tts_load = {"vocos": loading.load_vocoder, "voicebox": loading.load_nar, "ar": loading.load_ar}[kind]
        loaded = tts_load(out)
        assert isinstance(loaded, tuple) == (kind != "vocos")

    ema_state, live_state = weights_of(task, kind, ema=True), weights_of(task, kind, ema=False)
    exported = model.codec_state_dict() if kind == "codec" else model.state_dict()
    assert exported.keys() == ema_state.keys()
    for k, v in exported.items():
        assert torch.equal(v, ema_state[k]), k
    assert any(not torch.equal(ema_state[k], live_state[k]) for k in ema_state)  # the two differ

    got = run_model(kind, model)
    with task.ema_weights():
        want = run_model(kind, getattr(task, MODULE[kind]))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    live = run_model(kind, getattr(task, MODULE[kind]))
    assert float((got - live).abs().max()) > 1e-4  # exporting the live weights would fail the check above


@pytest.mark.parametrize("kind", ["vocos", "ar"])
def test_no_ema_exports_the_live_weights(kind, checkpoints, tmp_path):
    task, ckpt = checkpoints[kind]
    out = tmp_path / "live"
    assert export_main([str(ckpt), str(out), "--no-ema"]) == 0
    live = weights_of(task, kind, ema=False)
    for k, v in loader(kind)(out).state_dict().items():
        assert torch.equal(v, live[k]), k


def test_export_without_ema_in_the_checkpoint(tmp_path, capsys):
    task = make_task("voicebox", ema=None)
    ckpt = save_checkpoint(task, tmp_path / "plain.ckpt", "voicebox")
    assert export_main([str(ckpt), str(tmp_path / "out")]) == 0
    assert "no EMA in the checkpoint" in capsys.readouterr().out
    exported = loader("voicebox")(tmp_path / "out").state_dict()
    for k, v in task.nar.state_dict().items():
        assert torch.equal(exported[k], v), k


def test_export_refuses_bad_inputs(checkpoints, tmp_path, capsys):
    _, ckpt = checkpoints["vocos"]
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert export_main([str(ckpt), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert export_main([str(ckpt), str(out), "--force"]) == 0  # --force writes into it

    plain = tmp_path / "weights.pt"  # a bare state dict: no task to rebuild
    torch.save({"w": torch.zeros(2)}, plain)
    assert export_main([str(plain), str(tmp_path / "x")]) == 2
    assert str(plain) in capsys.readouterr().err
    assert export_main([str(tmp_path / "absent.ckpt"), str(tmp_path / "y")]) == 2


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_export_and_average_never_unpickle_code(checkpoints, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"generator.x": torch.zeros(2)}, "hyper_parameters": {"p": Evil(marker)}}, evil)
    assert export_main([str(evil), str(tmp_path / "out")]) == 2
    assert average_main([str(checkpoints["vocos"][1]), str(evil), str(tmp_path / "avg.ckpt")]) == 2
    assert not marker.exists()
    assert str(evil) in capsys.readouterr().err


def test_help(capsys):
    for main, words in ((export_main, ("CKPT", "--no-ema", "from_pretrained")),
                        (average_main, ("CKPT", "OUT", "optimiser"))):
        with pytest.raises(SystemExit) as exc:
            main(["--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out.replace("ckpt", "CKPT")
        assert all(w in text for w in words), text


# ------------------------------------------------------------------------------------------------ average
def test_average_is_the_parameter_mean_and_exports(tmp_path, capsys):
    a, b = make_task("vocos", seed=1), make_task("vocos", seed=2)
    pa, pb = save_checkpoint(a, tmp_path / "a.ckpt", "vocos"), save_checkpoint(b, tmp_path / "b.ckpt", "vocos")
    out = tmp_path / "avg.ckpt"
    assert average_main([str(pa), str(pb), str(out)]) == 0
    assert "and EMA weights of 2 VocosTask" in capsys.readouterr().out

    avg = torch.load(out, weights_only=True)  # loads safely, like any task checkpoint
    sa, sb = a.state_dict(), b.state_dict()
    assert avg["state_dict"].keys() == sa.keys()
    for k, v in avg["state_dict"].items():
        want = (sa[k] + sb[k]) / 2 if v.is_floating_point() else sa[k]
        assert v.dtype == sa[k].dtype and torch.equal(v, want), k
    ea, eb = a.ema.state_dict()["weights"], b.ema.state_dict()["weights"]
    for k, v in avg["ema"]["weights"].items():
        assert torch.equal(v, (ea[k] + eb[k]) / 2), k
    assert not any(k in avg for k in ("optimizer_states", "lr_schedulers", "rng_states"))  # dropped
    assert avg["flexitrain_task"] == "VocosTask" and avg["averaged_from"] == [str(pa), str(pb)]

    # The average exports like any checkpoint: the mean EMA weights go into the inference folder.
    assert export_main([str(out), str(tmp_path / "export")]) == 0
    exported = loader("vocos")(tmp_path / "export").state_dict()
    prefix = "generator."
    for k, v in exported.items():
        assert torch.equal(v, (ea[k] + eb[k]) / 2 if k in ea else avg["state_dict"][prefix + k]), k


def test_average_refuses_mismatched_checkpoints(checkpoints, tmp_path, capsys):
    one = save_checkpoint(make_task("vocos", seed=1), tmp_path / "one.ckpt", "vocos")
    two = save_checkpoint(make_task("vocos", seed=1, num_layers=2), tmp_path / "two.ckpt", "vocos")
    out = tmp_path / "avg.ckpt"
    assert average_main([str(one), str(two), str(out)]) == 2
    err = capsys.readouterr().err
    assert str(two) in err and "generator.backbone.convnext.1.dwconv.weight" in err and "unexpected" in err
    assert not out.exists()

    assert average_main([str(one), str(checkpoints["voicebox"][1]), str(out)]) == 2  # another task
    err = capsys.readouterr().err
    assert "VocosTask" in err and "VoiceboxTask" in err

    no_ema = save_checkpoint(make_task("vocos", seed=3, ema=None), tmp_path / "no_ema.ckpt", "vocos")
    assert average_main([str(one), str(no_ema), str(out)]) == 2
    assert "does not" in capsys.readouterr().err and not out.exists()

    assert average_main([str(one), str(out)]) == 2  # a single checkpoint
    assert "at least two" in capsys.readouterr().err
