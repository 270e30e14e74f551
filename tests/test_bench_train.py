"""tools/bench_train.py end to end on CPU: the real training step through a Lightning Trainer, FLOPs per phase,
dispatched ops and host syncs per step, and the one-line summary it ends with."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^bench_train: (?P<rate>[\d.e+-]+) (?P<unit>\S+) \| (?P<ms>[\d.]+) ms/step \| (?P<f>[\d.e+-]+) TFLOP/step "
    r"\(useful (?P<u>[\d.e+-]+)\) \| MFU (?P<mfu>\S+) % of (?P<peak>\S+) TFLOP/s \| ops/step (?P<ops>\d+) \| "
    r"syncs/step (?P<syncs>\d+)$")
# A codec small enough for a few CPU steps in seconds (as tests/codec_fixtures.py's micro model).
MICRO_CODEC = [
    "model.encoder_dim=4", "model.decoder_dim=32", "model.n_codebooks=2", "model.codebook_size=32",
    "model.transformer_num_layers=1", "model.transformer_dim=32", "model.transformer_dim_feedforward=64",
    "model.transformer_num_heads=2", "model.convnext_dim=32", "model.agg_transformer_dim=32",
    "model.agg_transformer_dim_feedforward=64", "model.agg_transformer_num_heads=2", "task.teacher.num_blocks=1",
    "task.discriminator.periods=[2]", "task.discriminator.period_channels=[4,8,8,8]",
    "task.discriminator.fft_sizes=[256]", "task.discriminator.channels=4",
]
TINY = ["--warmup", "2", "--steps", "3", "--batch", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "tools" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(bench, capsys, tmp_path, args):
    out_json = tmp_path / "bench.json"
    result = bench.main([*args, "--json", str(out_json)])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    m = LINE.match(lines[-1])
    assert m, f"last line does not parse: {lines[-1]!r}"
    assert json.loads(out_json.read_text())["flops"]["total"] == result["flops"]["total"]
    return result, m, "\n".join(lines)


def _check_flops(result, m):
    fl = result["flops"]
    assert fl["total"] > 0
    assert fl["total"] == sum(fl["phases"].values()), fl["phases"]
    assert 0 < fl["useful"] <= fl["total"]
    assert float(m["f"]) == pytest.approx(fl["total"] / 1e12, rel=1e-3)
    assert float(m["u"]) == pytest.approx(fl["useful"] / 1e12, rel=1e-3)
    assert float(m["ms"]) > 0 and float(m["rate"]) > 0
    assert int(m["ops"]) > 100 and int(m["syncs"]) == result["syncs_per_step"] == len(result["sync_events"])
    assert m["mfu"] == "n/a" and m["peak"] == "n/a"  # CPU: no peak unless --peak-tflops
    assert len(result["step_ms"]["all"]) == 3


def test_codec_demo_step(bench, capsys, tmp_path):
    result, m, out = _run(bench, capsys, tmp_path,
                          ["--recipe", "codec_demo", *TINY, "--seconds", "0.32", *MICRO_CODEC])
    _check_flops(result, m)
    assert m["unit"] == "audio-s/s"
    phases = result["flops"]["phases"]
    assert set(phases) == {"teacher", "generator", "d_step", "g_side_d"}
    assert all(phases[p] > 0 for p in ("generator", "d_step", "g_side_d")), phases  # GAN on from step 0
    if "task.teacher_features" not in result["flops"]["missing_hooks"]:
        assert phases["teacher"] > 0
    assert [b["kind"] for b in result["flops"]["backwards"]] == ["D loss", "G loss"]
    assert result["loggers"] and result["log_every_n_steps"] == 10  # logging as in real training
    for key in ("device cpu", "precision 32-true", "cudnn.benchmark", "TF32", "compile off", "batch 1 x 0.32 s"):
        assert key in out


def test_ar_tts_demo_step(bench, capsys, tmp_path):
    result, m, _ = _run(bench, capsys, tmp_path, ["--recipe", "ar_tts_demo", *TINY, "--seconds", "0.5"])
    _check_flops(result, m)
    assert result["task"] == "ar_tts" and m["unit"] == "speech-tokens/s"
    assert set(result["flops"]["phases"]) == {"targets", "model"}
    assert result["flops"]["phases"]["model"] > 0
    assert result["flops"]["useful"] == result["flops"]["total"]  # no discriminator: nothing thrown away
    # No host sync: range checks on the host batch, gathers instead of boolean indexing, logging without .item().
    assert int(m["syncs"]) == 0, result["sync_events"]


def test_voicebox_demo_step(bench, capsys, tmp_path):
    """On-the-fly targets (frozen random codec + teacher) and the flow-matching step, with no host sync."""
    result, m, _ = _run(bench, capsys, tmp_path, ["--task", "voicebox", "--recipe", "nar_voicebox_demo", *TINY,
                                                  "--seconds", "0.5"])
    _check_flops(result, m)
    assert result["task"] == "voicebox"
    assert int(m["syncs"]) == 0, result["sync_events"]


def test_vocos_demo_step(bench, capsys, tmp_path):
    """The Vocos GAN step (mel -> waveform, multi-resolution D) with its D-step / G-side-D split and no host sync
    (lengths checked on the host before the transfer)."""
    result, m, _ = _run(bench, capsys, tmp_path, ["--task", "vocos", "--recipe", "vocos_24k_demo", *TINY,
                                                  "--seconds", "0.5"])
    _check_flops(result, m)
    phases = result["flops"]["phases"]
    assert result["task"] == "vocos" and phases["d_step"] > 0 and phases["g_side_d"] > 0
    assert int(m["syncs"]) == 0, result["sync_events"]


def _toy_gan_step(bench, freeze_d: bool):
    """One GAN step of a conv G and D under FlopCounterMode + PhaseFlops (no Lightning): D step on the detached
    fake, then the generator loss through D, with D's parameters frozen or not during the generator backward."""
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.generator = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 1, 3, padding=1))
            self.discriminator = nn.Sequential(nn.Conv1d(1, 8, 5), nn.LeakyReLU(0.1), nn.Conv1d(8, 1, 3))

        def backward(self, loss):
            loss.backward()

    torch.manual_seed(0)
    task, x = Toy(), torch.randn(2, 1, 64)
    fc = FlopCounterMode(display=False)
    tracker = bench.PhaseFlops(task, "vocos", fc)
    tracker.install()
    with fc:
        fake = task.generator(x)
        task.backward(task.discriminator(fake.detach()).pow(2).mean() + (1 - task.discriminator(x)).pow(2).mean())
        task.discriminator.requires_grad_(not freeze_d)
        task.backward((1 - task.discriminator(fake)).pow(2).mean())
    tracker.remove()
    return fc.get_total_flops(), tracker


def test_phase_flops_leave_out_thrown_away_d_weight_gradients(bench):
    total, t = _toy_gan_step(bench, freeze_d=False)
    assert sum(t.flops.values()) == total
    # D's weight gradients in the generator backward: 2·B·Cout·Cin·K·Lout per conv (64 -> 60 -> 58 samples)
    assert t.wasted == 2 * 2 * (8 * 1 * 5 * 60 + 1 * 8 * 3 * 58)
    assert [b["kind"] for b in t.backwards] == ["D loss", "G loss"]
    frozen_total, f = _toy_gan_step(bench, freeze_d=True)
    assert f.wasted == 0 and total - frozen_total == t.wasted  # freezing D removes exactly those FLOPs
    assert f.flops["d_step"] == t.flops["d_step"] and f.flops["generator"] == t.flops["generator"]
