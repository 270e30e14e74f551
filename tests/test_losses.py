"""Mel filterbank / mel loss parity with the librosa+audiotools formulas, masking, GAN losses."""

import math

import numpy as np
import pytest
import torch

from flexitrain.audio.mel import MelSpectrogram, melscale_fbanks
from flexitrain.losses import (
    DEFAULT_LOSS_WEIGHTS,
    MultiScaleMelLoss,
    build_repa_mlp,
    combine_losses,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    group_mask,
    masked_mean,
    mean_pool_groups,
    repa_loss,
    resolve_loss_weights,
    semantic_distill_loss,
    si_sdr,
)
from tolerances import EPS, assert_parity, scaled_check

# librosa 0.11.0: librosa.filters.mel(sr=16000, n_fft=32, n_mels=5).T  (Slaney scale + norm)
LIBROSA_SLANEY_16K_32_5 = np.array([
    [0, 0, 0, 0, 0], [0.00197798, 0, 0, 0, 0], [0.00002232, 0.00166716, 0, 0, 0],
    [0, 0.00046617, 0.00079041, 0, 0], [0, 0, 0.00079628, 0.00017635, 0],
    [0, 0, 0.00032026, 0.00045979, 0], [0, 0, 0, 0.00059527, 0.00003288],
    [0, 0, 0, 0.00042649, 0.00013337], [0, 0, 0, 0.00025772, 0.00023387],
    [0, 0, 0, 0.00008895, 0.00033436], [0, 0, 0, 0, 0.00035903], [0, 0, 0, 0, 0.00029919],
    [0, 0, 0, 0, 0.00023935], [0, 0, 0, 0, 0.00017951], [0, 0, 0, 0, 0.00011968],
    [0, 0, 0, 0, 0.00005984], [0, 0, 0, 0, 0],
])
# librosa.filters.mel(sr=16000, n_fft=64, n_mels=6, htk=True, norm=None).T, a few entries
LIBROSA_HTK_16K_64_6 = [(1, 0, 0.82418406), (2, 1, 0.45235124), (3, 2, 0.019092),
                        (9, 3, 0.9949803), (15, 5, 0.11730157), (22, 5, 0.9504929)]


def np_mel_filters(sr, n_fft, n_mels, scale, norm):
    """Textbook triangular filters (librosa's construction), in numpy."""
    def hz2mel(f):
        f = np.asarray(f, dtype=np.float64)
        if scale == "htk":
            return 2595.0 * np.log10(1.0 + f / 700.0)
        lin = f / (200.0 / 3)
        return np.where(f >= 1000, 15.0 + np.log(np.maximum(f, 1e-9) / 1000) / (np.log(6.4) / 27), lin)

    def mel2hz(m):
        if scale == "htk":
            return 700.0 * (10 ** (m / 2595.0) - 1)
        return np.where(m >= 15.0, 1000 * np.exp(np.log(6.4) / 27 * (m - 15.0)), m * 200.0 / 3)

    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    pts = mel2hz(np.linspace(hz2mel(0.0), hz2mel(sr / 2), n_mels + 2))
    fb = np.zeros((len(freqs), n_mels))
    for i in range(n_mels):
        lo, c, hi = pts[i : i + 3]
        fb[:, i] = np.maximum(0, np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)))
        if norm == "slaney":
            fb[:, i] *= 2.0 / (hi - lo)
    return fb


def np_mel_loss(x, y, fb_rate, windows=(32, 64, 128, 256, 512, 1024, 2048),
                n_mels=(5, 10, 20, 40, 80, 160, 320)):
    """Official recipe in numpy: periodic Hann, centred reflect STFT, |X|, Slaney mel, 2·L1(log10)."""
    total = 0.0
    for w, m in zip(windows, n_mels):
        hop = w // 4
        win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(w) / w)
        fb = np_mel_filters(fb_rate, w, m, "slaney", "slaney")

        def mel(sig):
            p = np.pad(sig, (w // 2, w // 2), mode="reflect")
            frames = np.stack([p[i * hop : i * hop + w] for i in range(1 + len(sig) // hop)])
            return np.abs(np.fft.rfft(frames * win, axis=-1)) @ fb  # [frames, n_mels]

        total += 2.0 * np.mean(np.abs(np.log10(np.maximum(mel(x), 1e-5)) - np.log10(np.maximum(mel(y), 1e-5))))
    return total


# ---------------------------------------------------------------- mel filterbank

@pytest.mark.parity
def test_slaney_fbank_matches_librosa_values():
    fb = melscale_fbanks(17, 0.0, 8000.0, 5, 16000, norm="slaney", mel_scale="slaney")
    # The literals are librosa's float32 values printed to 8 decimals (±5e-9), ours may round to the neighbouring
    # float32 (1 ulp ≤ EPS·|value|): 5e-9 + EPS·|ref| (was rtol 1e-4 + atol 1e-8). Measured 4.99e-9.
    ref = torch.tensor(LIBROSA_SLANEY_16K_32_5, dtype=torch.float64)
    assert_parity(scaled_check(fb, ref, rel=5e-9, scale=1.0, elementwise=EPS, name="Slaney filterbank vs librosa"))


@pytest.mark.parity
def test_htk_fbank_matches_librosa_values():
    fb = melscale_fbanks(33, 0.0, 8000.0, 6, 16000, norm=None, mel_scale="htk")
    for f, m, value in LIBROSA_HTK_16K_64_6:
        # Literals printed to 6-8 decimals (±5e-7 for 0.019092) + 1 ulp of float32 (≤ 1.2e-7 below 1): 1e-6.
        assert fb[f, m].item() == pytest.approx(value, abs=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("sr,n_fft,n_mels,scale,norm", [
    (16000, 2048, 320, "slaney", "slaney"), (16000, 400, 80, "htk", None),
    (24000, 512, 80, "slaney", "slaney"), (16000, 1024, 128, "htk", "slaney"),
])
def test_fbank_matches_numpy_formula(sr, n_fft, n_mels, scale, norm):
    fb = melscale_fbanks(n_fft // 2 + 1, 0.0, sr / 2, n_mels, sr, norm=norm, mel_scale=scale)
    ref = np_mel_filters(sr, n_fft, n_mels, scale, norm)
    # Both are float64 formulas; ours is rounded once to float32 (½ ulp), so ≤ EPS·|value| and zeros exactly where
    # the reference has them (was rtol 1e-4 + atol 1e-7·max). Measured ≤ 0.49 ulp.
    assert_parity(scaled_check(fb, torch.from_numpy(ref), elementwise=EPS, name=f"{scale}/{norm} filterbank"))
    wrong = melscale_fbanks(n_fft // 2 + 1, 0.0, sr / 2 - 10, n_mels, sr, norm=norm, mel_scale=scale)
    assert not scaled_check(wrong, torch.from_numpy(ref), elementwise=EPS, name="f_max 10 Hz low").ok


def test_fbank_rejects_bad_args():
    with pytest.raises(ValueError, match="mel_scale"):
        melscale_fbanks(17, 0.0, 8000.0, 5, 16000, mel_scale="foo")
    with pytest.raises(ValueError, match="norm"):
        melscale_fbanks(17, 0.0, 8000.0, 5, 16000, norm="area")


def test_mel_spectrogram_log_and_shape():
    x = torch.randn(2, 1, 4000)
    mel = MelSpectrogram(16000, n_fft=512, n_mels=40)
    out = mel(x)
    assert out.shape == (2, 40, 1 + 4000 // 128)
    log = MelSpectrogram(16000, n_fft=512, n_mels=40, log=True)(x)
    torch.testing.assert_close(log, out.clamp(min=1e-5).log10())
    with pytest.raises(ValueError, match="mono"):
        mel(torch.randn(2, 2, 4000))


# ---------------------------------------------------------------- mel loss

def _speechlike(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / 16000
    f0 = 100 + 200 * torch.rand(batch, 1, generator=g)
    harmonics = sum(torch.sin(2 * math.pi * k * f0 * t) / k for k in range(1, 20))
    return (0.3 * harmonics + 0.01 * torch.randn(batch, length, generator=g)).unsqueeze(1)


@pytest.mark.parity
@pytest.mark.parametrize("assume", [None, 24000])
def test_mel_loss_matches_numpy_reference(assume):
    x = _speechlike(1, 6000, seed=1)
    y = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    loss = MultiScaleMelLoss(sample_rate=16000, assume_sample_rate=assume)(x, y)
    ref = np_mel_loss(x[0, 0].double().numpy(), y[0, 0].double().numpy(), assume or 16000)
    # A float32 mean of ~2.6·10^4 |Δlog10 mel| terms against float64: each well-resolved term is off by ~10 EPS of its
    # log, the (pairwise) sums by ~log2(n) EPS, and no bin of this signal is near the 1e-5 floor. 64 EPS relative
    # (was 1e-4 = 840 EPS). Measured ≤ 0.8 EPS with MKL, pocketfft and float64 FFTs.
    assert loss.item() == pytest.approx(ref, rel=64 * EPS)


def test_true_rate_mel_differs_from_24k_warped():
    x = _speechlike(2, 8000)
    y = x + 0.05 * torch.randn_like(x)
    true_rate = MultiScaleMelLoss(16000)(x, y)
    warped = MultiScaleMelLoss(16000, assume_sample_rate=24000)(x, y)
    assert abs(true_rate.item() - warped.item()) > 1e-3 * true_rate.item()
    fb16 = MultiScaleMelLoss(16000).mels[-1].mel_fb
    fb24 = MultiScaleMelLoss(16000, assume_sample_rate=24000).mels[-1].mel_fb
    assert (fb16 - fb24).abs().max() > 0.1 * fb16.abs().max()


def test_mel_loss_zero_identical_and_decreasing_with_noise():
    loss_fn = MultiScaleMelLoss()
    x = _speechlike(2, 8000)
    assert loss_fn(x, x).item() == 0.0
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    losses = [loss_fn(x + s * noise, x).item() for s in (0.3, 0.1, 0.03, 0.01)]
    assert all(a > b > 0 for a, b in zip(losses, losses[1:])), losses


def test_mel_loss_unchanged_by_extra_padding():
    loss_fn = MultiScaleMelLoss()
    lengths = torch.tensor([7000, 4321])
    x = _speechlike(2, 7000, seed=4)
    y = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    x[1, :, 4321:] = 0
    y[1, :, 4321:] = 0
    base = loss_fn(x, y, lengths)
    padded = loss_fn(torch.nn.functional.pad(x, (0, 3000)), torch.nn.functional.pad(y, (0, 3000)), lengths)
    torch.testing.assert_close(padded, base, rtol=1e-5, atol=1e-6)
    # Junk in the padding of the prediction must not leak into the loss either.
    junk = torch.nn.functional.pad(y, (0, 3000))
    junk[1, :, 4321:] = 5.0
    torch.testing.assert_close(loss_fn(torch.nn.functional.pad(x, (0, 3000)), junk, lengths), base,
                               rtol=1e-5, atol=1e-6)
    # A full-length item alone equals the unmasked loss on it.
    solo = loss_fn(x[:1], y[:1])
    torch.testing.assert_close(loss_fn(x[:1], y[:1], lengths[:1]), solo)
    # Without lengths the padded batch gives a different (diluted) value.
    assert abs(loss_fn(torch.nn.functional.pad(x, (0, 3000)), torch.nn.functional.pad(y, (0, 3000))).item()
               - base.item()) > 1e-3


def test_mel_loss_shape_errors():
    loss_fn = MultiScaleMelLoss()
    with pytest.raises(ValueError, match="trim"):
        loss_fn(torch.zeros(1, 1, 4000), torch.zeros(1, 1, 4001))
    with pytest.raises(ValueError, match="lengths"):
        loss_fn(torch.zeros(2, 1, 4000), torch.zeros(2, 1, 4000), torch.tensor([4000, 5000]))


def test_mel_loss_gradient_flows():
    x = _speechlike(1, 4000).requires_grad_(True)
    loss = MultiScaleMelLoss()(x, _speechlike(1, 4000, seed=9))
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- GAN losses

def _fmaps(seed, n_disc=3, n_maps=4):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(2, 3, 5, generator=g) for _ in range(n_maps)] for _ in range(n_disc)]


def test_lsgan_known_values():
    ones = [[torch.zeros(2, 4), torch.ones(2, 3)] for _ in range(2)]
    zeros = [[torch.zeros(2, 4), torch.zeros(2, 3)] for _ in range(2)]
    assert discriminator_loss(zeros, ones).item() == 0.0  # perfect D
    assert discriminator_loss(ones, zeros).item() == pytest.approx(4.0)  # 2 discs × (1 + 1)
    assert generator_adversarial_loss(ones).item() == 0.0
    assert generator_adversarial_loss(zeros).item() == pytest.approx(2.0)


def test_feature_matching():
    real = _fmaps(0)
    assert feature_matching_loss(real, real).item() == 0.0
    fake = [[m + 0.5 for m in d] for d in real]
    # Σ over 3 discs × 3 non-logit maps of mean |0.5|; the logit map is excluded.
    assert feature_matching_loss(fake, real).item() == pytest.approx(3 * 3 * 0.5)
    fake_req = [[m.clone().requires_grad_(True) for m in d] for d in fake]
    real_req = [[m.clone().requires_grad_(True) for m in d] for d in real]
    feature_matching_loss(fake_req, real_req).backward()
    assert real_req[0][0].grad is None and fake_req[0][0].grad is not None
    with pytest.raises(ValueError, match="structures"):
        feature_matching_loss(fake, real[:2])


# ---------------------------------------------------------------- masking, distill, REPA

def test_masked_mean_ignores_padding():
    values = torch.tensor([[[1.0, 3.0, 100.0]], [[2.0, 100.0, 100.0]]])  # [B=2, C=1, T=3]
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="mask"):
        masked_mean(values, mask[:, :2])


def test_mean_pool_groups():
    feats = torch.arange(12.0).view(1, 2, 6)  # channel 0: 0..5, channel 1: 6..11
    token_lengths = torch.tensor([[2, 3, 1, 0]])
    pooled = mean_pool_groups(feats, token_lengths)
    expected = torch.tensor([[[0.5, 3.0, 5.0, 0.0], [6.5, 9.0, 11.0, 0.0]]])
    torch.testing.assert_close(pooled, expected)
    with pytest.raises(ValueError, match="sum to at most"):
        mean_pool_groups(feats, torch.tensor([[4, 3]]))


def test_distill_loss_masked_over_padded_groups():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 8, 5, generator=g)
    pred = target + 0.1 * torch.randn(2, 8, 5, generator=g)
    token_lengths = torch.tensor([[1, 2, 1, 3, 1], [2, 2, 1, 0, 0]])
    mask = group_mask(token_lengths)
    base = semantic_distill_loss(pred, target, mask)
    ref = torch.cat([(pred - target)[0].pow(2).flatten(), (pred - target)[1, :, :3].pow(2).flatten()]).mean()
    torch.testing.assert_close(base, ref)
    junk = pred.clone()
    junk[1, :, 3:] = 50.0  # garbage in padded groups changes nothing
    torch.testing.assert_close(semantic_distill_loss(junk, target, mask), base)
    p = pred.clone().requires_grad_(True)
    t = target.clone().requires_grad_(True)
    semantic_distill_loss(p, t, mask).backward()
    assert t.grad is None and p.grad[1, :, 3:].abs().sum() == 0


def test_repa_mlp_keys_and_detached_target():
    holder = torch.nn.Module()
    holder.repa_mlp = build_repa_mlp()
    shapes = {k: tuple(v.shape) for k, v in holder.state_dict().items()}
    assert shapes["repa_mlp.0.weight"] == (1536, 512) and shapes["repa_mlp.2.weight"] == (512, 1536)
    x = torch.randn(2, 512, 7)
    pred = holder.repa_mlp(x.transpose(1, 2)).transpose(1, 2)
    target = torch.randn(2, 512, 7, requires_grad=True)
    for kind in ("mse", "cosine"):
        loss = repa_loss(pred, target, kind=kind)
        assert loss.item() > 0
        assert repa_loss(target, target, kind=kind).item() == pytest.approx(0.0, abs=1e-6)
    repa_loss(pred, target).backward()
    assert target.grad is None
    with pytest.raises(ValueError, match="kind"):
        repa_loss(pred, target, kind="l2")


def test_weights_and_combine():
    assert DEFAULT_LOSS_WEIGHTS == {"mel": 15.0, "adv": 1.0, "feat": 2.0, "commit": 0.25,
                                    "codebook": 1.0, "distill": 15.0, "repa": 1.0}
    weights = resolve_loss_weights({"repa": 0.0})
    with pytest.raises(KeyError, match="unknown loss weight"):
        resolve_loss_weights({"mell": 1.0})
    mel = torch.tensor(2.0, requires_grad=True)
    terms = {"mel": mel, "adv": torch.tensor(1.0), "repa": torch.tensor(7.0), "commit": torch.tensor(4.0)}
    total, logs = combine_losses(terms, weights)
    assert total.item() == pytest.approx(15 * 2 + 1 + 0 + 0.25 * 4)
    assert set(logs) == {"mel", "adv", "repa", "commit", "total"}
    assert logs["repa"].item() == 7.0 and not logs["mel"].requires_grad
    total.backward()
    assert mel.grad.item() == 15.0
    with pytest.raises(KeyError, match="no weight"):
        combine_losses({"sisdr": torch.tensor(1.0)}, weights)


def test_si_sdr_known_value_scale_invariance_and_padding():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, 8000, generator=g)
    s = s - s.mean()
    n = torch.randn(1, 8000, generator=g)
    n = n - n.mean()
    n = n - (n * s).sum() / (s * s).sum() * s  # orthogonal to s
    n = n * (s.norm() / n.norm()) * 0.1  # 20 dB below
    assert si_sdr(s + n, s).item() == pytest.approx(20.0, abs=1e-3)
    assert si_sdr(3.0 * (s + n), s).item() == pytest.approx(20.0, abs=1e-3)
    padded_pred = torch.nn.functional.pad(s + n, (0, 500), value=1.0)  # junk in the padding
    padded_tgt = torch.nn.functional.pad(s, (0, 500))
    assert si_sdr(padded_pred, padded_tgt, torch.tensor([8000])).item() == pytest.approx(20.0, abs=1e-3)
    assert si_sdr(padded_pred, padded_tgt).item() < 19.0
