"""FlexiCodec inference API and training forward (tiny config, random weights; no shared data needed)."""

from __future__ import annotations

import pytest
import torch

from codec_fixtures import TINY_CODEC as TINY

from flexitrain.models.codec import FlexiCodec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = FlexiCodec(**TINY)
    with torch.no_grad():  # random but non-degenerate weights (LayerScale etc. away from init)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def teacher_len(n: int) -> int:
    """SenseVoice LFR frames for n samples at 16 kHz."""
    return -(-(1 + (n - 400) // 160) // 6)


def smooth_features(B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.randn(B, 512, T, generator=g), dim=2) * 0.3  # neighbours similar → merging


def test_batched_equals_single_item(model):
    lengths = [12800, 9111, 20480, 5777, 20000]  # the last one pads to the longest's hop multiple
    N = max(lengths)
    B = len(lengths)
    wav = torch.randn(B, N, generator=torch.Generator().manual_seed(1)) * 0.1
    sem_len = [teacher_len(n) for n in lengths]
    sem = smooth_features(B, max(sem_len))
    for i, (n, s) in enumerate(zip(lengths, sem_len)):  # garbage in the padding must not matter
        wav[i, n:] = 0.7
        sem[i, :, s:] = 5.0
    batch = model.encode(wav, torch.tensor(lengths), threshold=0.91, num_quantizers=4,
                         semantic_features=sem, semantic_lengths=torch.tensor(sem_len))
    audio = model.decode(batch)
    assert audio.audio.shape == (B, 1, N) and audio.lengths.tolist() == lengths
    derived = model.encode(wav, torch.tensor(lengths), threshold=0.91, num_quantizers=4, semantic_features=sem)
    assert torch.equal(derived.acoustic_codes, batch.acoustic_codes)  # teacher lengths derived from `lengths`
    assert bool((batch.num_tokens < batch.num_frames).any())  # merging happened
    for i, (n, s) in enumerate(zip(lengths, sem_len)):
        one = model.encode(wav[i:i + 1, :n], threshold=0.91, num_quantizers=4, semantic_features=sem[i:i + 1, :, :s])
        g = int(one.num_tokens[0])
        assert int(batch.num_tokens[i]) == g
        assert torch.equal(one.semantic_codes[0], batch.semantic_codes[i, :g])
        assert torch.equal(one.acoustic_codes[0], batch.acoustic_codes[i, :, :g])
        assert torch.equal(one.token_lengths[0], batch.token_lengths[i, :g])
        assert int(batch.token_lengths[i, g:].abs().sum() + batch.semantic_codes[i, g:].abs().sum()) == 0
        single_audio = model.decode(one).audio[0, 0]
        assert single_audio.shape == (n,)
        assert torch.allclose(single_audio, audio.audio[i, 0, :n], atol=1e-5)
        assert float(audio.audio[i, 0, n:].abs().sum()) == 0.0


@pytest.mark.parametrize("n", [12345, 2561, 20001])
def test_odd_lengths_shapes(model, n):
    wav = torch.randn(n) * 0.1
    sem = smooth_features(1, teacher_len(n))
    tok = model.encode(wav, threshold=0.91, num_quantizers=3, semantic_features=sem)
    G = tok.token_lengths.shape[1]
    assert tok.semantic_codes.shape == (1, G) and tok.semantic_codes.dtype == torch.long
    assert tok.acoustic_codes.shape == (1, 2, G)
    assert int(tok.semantic_codes.max()) < 8**5 and int(tok.acoustic_codes.max()) < 64
    frames = min(-(-n // 1280), int(teacher_len(n) / 1.33333))
    assert int(tok.num_frames[0]) == frames == int(tok.token_lengths.sum())
    out = model.decode(tok)
    assert out.audio.shape == (1, 1, n) and out.lengths.tolist() == [n] and out.sample_rate == 16000
    assert torch.isfinite(out.audio).all()


def test_resampled_input_and_output(model):
    sr, n = 44100, 44100 + 37
    wav = torch.randn(2, n) * 0.1
    n16 = round(n * 16000 / sr)
    tok = model.encode(wav, sample_rate=sr, threshold=1.0, num_quantizers=2,
                       semantic_features=smooth_features(2, teacher_len(n16)))
    assert tok.sample_rate == sr and tok.num_samples.tolist() == [n, n]
    out = model.decode(tok)
    assert out.sample_rate == sr and out.audio.shape == (2, 1, n)
    out16 = model.decode(tok, sample_rate=16000)
    assert out16.audio.shape == (2, 1, n16) and out16.lengths.tolist() == [n16, n16]


def test_fixed_rate_at_threshold_one_and_no_sticky_state(model):
    n = 32000  # 25 acoustic frames; 34 teacher frames → int(34 / 1.33333) = 25
    wav = torch.randn(1, n) * 0.1
    sem = smooth_features(1, 34)
    merged = model.encode(wav, threshold=0.8, num_quantizers=8 - 3, semantic_features=sem)
    assert int(merged.num_tokens[0]) < 25
    tok = model.encode(wav, threshold=1.0, num_quantizers=5, semantic_features=sem)  # τ is per call
    assert int(tok.num_tokens[0]) == int(tok.num_frames[0]) == 25
    assert bool((tok.token_lengths == 1).all())
    assert float(tok.frame_rate[0]) == 12.5
    assert float(tok.bitrate[0]) == 12.5 * (15 + 4 * 6)  # FSQ 15 bits + 4 RVQ stages × 6 bits
    semantic_only = model.encode(wav, threshold=1.0, num_quantizers=1, semantic_features=sem)
    assert semantic_only.acoustic_codes is None and float(semantic_only.bitrate[0]) == 12.5 * 15
    assert model.decode(semantic_only).audio.shape == (1, 1, n)


def test_threshold_per_item(model):
    sem = smooth_features(2, 34)
    wav = torch.randn(2, 32000) * 0.1
    tok = model.encode(wav, threshold=torch.tensor([1.0, 0.8]), num_quantizers=2,
                       semantic_features=torch.cat([sem[:1], sem[:1]]))
    assert int(tok.num_tokens[0]) == 25 and int(tok.num_tokens[1]) < 25


def test_bad_inputs_raise(model):
    with pytest.raises(ValueError, match="mono audio"):
        model.encode(torch.zeros(2, 2, 100), semantic_features=torch.zeros(2, 512, 3))
    with pytest.raises(ValueError, match="semantic_teacher"):
        model.encode(torch.zeros(1, 16000))
    with pytest.raises(ValueError, match="num_quantizers"):
        model.encode(torch.zeros(1, 16000), num_quantizers=99, semantic_features=torch.zeros(1, 512, 17))
    with pytest.raises(ValueError, match="too short"):
        model.encode(torch.zeros(1, 1281), num_quantizers=2, semantic_features=torch.zeros(1, 512, 1))
    with pytest.raises(ValueError, match="lengths"):
        model.encode(torch.zeros(2, 16000), lengths=torch.tensor([16000, 16001]), num_quantizers=2,
                     semantic_features=torch.zeros(2, 512, 17))


def test_training_forward_losses_and_gradients():
    torch.manual_seed(0)
    m = FlexiCodec(**TINY).train()
    wav = torch.randn(3, 32000) * 0.1
    sem = smooth_features(3, 33)
    out = m(wav, semantic_features=sem, bypass_quantize=False)
    G = out.token_lengths.shape[1]
    assert out.audio.shape == (3, 1, 32000)
    assert out.semantic_aggregated.shape == (3, 512, G) and out.semantic_target.shape == (3, 512, G)
    assert out.semantic_decoded.shape == (3, 64, G) and out.bottleneck_output.shape == (3, 64, 24)
    assert out.acoustic_codes.shape == (3, 4, G) and out.n_quantizers.min() >= 1 and out.n_quantizers.max() <= 4
    assert ((0.8 <= out.threshold) & (out.threshold <= 1.0)).all()  # dynamic τ in training
    assert torch.equal(out.token_lengths.sum(1), torch.full((3,), 24))
    loss = (out.audio - wav[:, None]).abs().mean() + 0.25 * out.commitment_loss + out.codebook_loss \
        + out.semantic_aggregated.pow(2).mean()
    loss.backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []
    bypass = m(wav, semantic_features=sem, bypass_quantize=True, threshold=1.0)
    assert bypass.acoustic_codes is None and float(bypass.commitment_loss) == 0.0 and bypass.bypassed_quantize
    assert bypass.token_lengths.shape[1] == 24


def test_inference_fast_paths_match_plain_computation(monkeypatch):
    """The blocked / in-place channels-last inference paths (Snake in cache-sized blocks, residual
    GEMM accumulated into its input) give the plain module results bit for bit, leave the
    caller's tensors alone, and the DAC decoder matches its [B, C, T] computation to rounding."""
    from flexitrain.models.codec import layers
    from flexitrain.models.codec.dac import ResidualUnit, to_channels_last

    monkeypatch.setattr(layers, "_CHUNK", 40 * 7)  # several blocks and a ragged last one
    torch.manual_seed(0)
    unit = ResidualUnit(40, dilation=3).eval()
    with torch.no_grad():
        for p in unit.parameters():
            p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(2, 40, 1, 53).contiguous(memory_format=torch.channels_last)
        alpha = unit.block[0].alpha
        plain = x + (alpha[..., None] + 1e-9).reciprocal() * torch.sin(alpha[..., None] * x).pow(2)
        keep = x.clone()
        assert torch.equal(layers.snake_channels_last(x, alpha), plain) and torch.equal(x, keep)
        y = x.clone()
        assert torch.equal(layers.snake_channels_last(y, alpha, inplace=True), plain) and torch.equal(y, plain)
        ref = unit(x)
        assert torch.equal(x, keep)
        z = x.clone()
        out = unit(z, inplace=True)
        assert torch.equal(out, ref) and out.data_ptr() == z.data_ptr()
        assert torch.allclose(ref.squeeze(2), unit.block(x.squeeze(2).contiguous()) + x.squeeze(2), atol=1e-5)

        m = FlexiCodec(**TINY).eval()
        lat = torch.randn(2, m.latent_dim, 6)
        lat_copy = lat.clone()
        fast = m.dac.decoder(lat, channels_last=True)
        assert torch.equal(lat, lat_copy)
        assert torch.allclose(fast, m.dac.decoder(lat), atol=1e-5)
        wav = torch.randn(2, 1, 6 * m.hop_length)
        wav_copy = wav.clone()
        lens = torch.tensor([6, 4]) * m.hop_length
        enc = m.dac.encoder(wav, lens, channels_last=True)
        assert torch.equal(wav, wav_copy)
        assert torch.allclose(enc, m.dac.encoder(wav, lens), atol=1e-5)
        assert torch.equal(to_channels_last(lat).squeeze(2), lat)


def test_folded_inference_weights_follow_fused_optimizer_steps():
    # Fused AdamW updates parameters in place without bumping their version counters; the folded weight-norm
    # cache used at inference must still see the new weights (cleared by the task's step hook / mode switch).
    from flexitrain.models.codec.layers import WNConv1d, clear_folded_weights

    conv = WNConv1d(4, 4, 3, padding=1)
    opt = torch.optim.AdamW(conv.parameters(), lr=0.1, fused=True)
    opt.register_step_post_hook(lambda *_: clear_folded_weights(conv))
    with torch.no_grad():
        before = conv.weight.clone()
    conv(torch.randn(1, 4, 8)).square().sum().backward()
    opt.step()
    with torch.no_grad():
        after = conv.weight
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, torch._weight_norm(conv.weight_v, conv.weight_g, 0), rtol=0, atol=0)
