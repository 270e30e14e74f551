"""Long-audio encode/decode (flexitrain/models/codec/long_audio.py): one window = exactly FlexiCodec.encode/decode;
longer inputs: window plan, seam stitching (tiling, frame count, lengths), and how the codes / audio differ from a
whole-file pass when the model is local (no attention), where only the seams may differ."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from flexitrain.models.codec.flexicodec import teacher_frames
from flexitrain.models.codec.long_audio import (ALIGN_FRAMES, _window_frames, decode_long, encode_long,
                                                plan_windows)
from flexitrain.models.codec.merging import frame_to_group_from_lengths

CHUNK, OVERLAP = 4.0, 1.6  # 48-frame windows, 21-frame overlaps (rounded up to the 3-frame grid)


def tiny_codec(**overrides):
    from hydra.utils import instantiate

    from flexitrain.utils.config import compose

    torch.manual_seed(0)
    cfg = compose(["model=codec_tiny"], return_hydra_config=False).model
    for k, v in overrides.items():
        cfg[k] = v
    return instantiate(cfg).eval()


class LocalTeacher(nn.Module):
    """A teacher without attention: each 16.67 Hz frame is a fixed random projection of its own 60 ms of audio, with
    SenseVoice's frame count. Features then depend only on local audio, so chunking can only change the seams."""

    def __init__(self, dim: int = 512):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.register_buffer("proj", torch.randn(dim, 960, generator=g) / 30)

    def forward(self, wav, lengths):
        n = teacher_frames(lengths)
        T = int(n.max())
        x = nn.functional.pad(wav, (0, max(0, T * 960 - wav.shape[-1])))[:, : T * 960].reshape(wav.shape[0], T, 960)
        feats = torch.tanh(x @ self.proj.T).transpose(1, 2)
        return feats * (torch.arange(T) < n[:, None]).unsqueeze(1), n


def tones(seconds: float, seed: int = 0) -> torch.Tensor:
    """Steady tones of random pitch, 0.3-1.2 s each: runs of similar frames that merge into tokens."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * 16000)
    parts, total = [], 0
    while total < n:
        seg = int(16000 * (0.3 + 0.9 * float(torch.rand((), generator=g))))
        t = torch.arange(seg) / 16000
        f = 100 + 900 * float(torch.rand((), generator=g))
        parts.append(0.3 * torch.sin(2 * torch.pi * f * t) + 0.01 * torch.randn(seg, generator=g))
        total += seg
    return torch.cat(parts)[:n]


def per_frame(tokens):
    """Semantic codes [T] and acoustic codes [Q, T] repeated over each token's frames."""
    f2g = frame_to_group_from_lengths(tokens.token_lengths)[0]
    return tokens.semantic_codes[0, f2g], tokens.acoustic_codes[0][:, f2g]


@pytest.fixture(scope="module")
def released_like():
    from flexitrain.tasks.teacher import build_teacher

    return tiny_codec(), build_teacher({"random_init": True, "num_blocks": 1}).eval()


@pytest.fixture(scope="module")
def local():
    """Mean-pool aggregation, no bottleneck transformer, a local teacher: every stage has a finite receptive field."""
    return tiny_codec(use_query_token_aggregator=False, transformer_num_layers=0), LocalTeacher()


def whole(codec, teacher, wav, sr=16000, nq=3):
    x = torch.as_tensor(wav)[None]
    from flexitrain.models.codec.flexicodec import resample

    x16, n16 = resample(x[:, None], torch.tensor([x.shape[-1]]), sr, codec.sample_rate)
    sem, sem_len = teacher(x16[:, 0], n16)
    return codec.encode(x, sample_rate=sr, threshold=0.91, num_quantizers=nq, semantic_features=sem,
                        semantic_lengths=sem_len)


@pytest.mark.parametrize("sr", [16000, 22050])
def test_shorter_than_a_chunk_is_exactly_encode_and_decode(released_like, sr):
    codec, teacher = released_like
    wav = tones(2.5, seed=sr)
    if sr != 16000:
        from flexitrain.audio.resample import resample as rs

        wav = rs(wav, 16000, sr)
    ref = whole(codec, teacher, wav, sr)
    out = encode_long(codec, wav, sr, 0.91, 3, teacher=teacher, chunk_seconds=CHUNK, overlap_seconds=OVERLAP)
    for name in ("semantic_codes", "acoustic_codes", "token_lengths", "num_tokens", "num_frames", "num_samples"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
    assert out.sample_rate == sr and torch.allclose(out.frame_rate, ref.frame_rate)
    torch.testing.assert_close(out.bitrate, ref.bitrate)
    for out_sr in (None, 24000):
        a, b = decode_long(codec, out, out_sr, CHUNK, OVERLAP), codec.decode(ref, out_sr)
        assert a.sample_rate == b.sample_rate and torch.equal(a.lengths, b.lengths)
        torch.testing.assert_close(a.audio, b.audio, rtol=0, atol=1e-6)


@pytest.mark.parametrize("T", [1, 48, 49, 75, 100, 151, 7500])
def test_window_plan(T):
    W, O = 48, 21
    plan = plan_windows(T, W, O)
    assert plan[0][0] == 0 and plan[-1][1] == T
    assert all(s % ALIGN_FRAMES == 0 and e - s <= W for s, e in plan)
    for (s0, e0), (s1, _) in zip(plan, plan[1:]):
        assert s0 < s1 and e0 - s1 >= O  # every seam has half an overlap of context on both sides
    assert len(plan) == (1 if T <= W else 1 + -(-(T - W) // (W - O)))


def test_window_settings_are_checked(released_like):
    codec, _ = released_like
    assert _window_frames(codec, CHUNK, OVERLAP) == (48, 21)
    with pytest.raises(ValueError, match="overlap_seconds=0.5 is too short"):
        _window_frames(codec, CHUNK, 0.5)
    with pytest.raises(ValueError, match="chunk_seconds=3.0 must be at least twice overlap_seconds"):
        _window_frames(codec, 3.0, 1.6)


def _clean_length(seconds: float) -> int:
    """A length whose teacher frame count is a multiple of 4, so the whole-file 16.67 -> 12.5 Hz interpolation has
    the exact 4/3 scale of every window (otherwise the whole-file grid itself drifts by up to a frame)."""
    n = int(seconds * 16000)
    while int(teacher_frames(torch.tensor(n))) % 4:
        n += 160
    return n


def test_long_input_tiles_and_preserves_frames(released_like):
    codec, teacher = released_like
    wav = tones(12.0, seed=3)
    ref = whole(codec, teacher, wav)
    out = encode_long(codec, wav, 16000, 0.91, 3, teacher=teacher, chunk_seconds=CHUNK, overlap_seconds=OVERLAP)
    lengths = out.token_lengths[0]
    assert int(out.num_frames) == int(ref.num_frames) == int(lengths.sum())  # the same 80 ms frames, once each
    assert int(out.num_tokens) == lengths.numel() and bool((lengths >= 1).all() & (lengths <= 8).all())
    assert out.acoustic_codes.shape == (1, 2, lengths.numel()) and out.semantic_codes.shape == (1, lengths.numel())
    # Windows batched together give the same tokens as one by one.
    batched = encode_long(codec, wav, 16000, 0.91, 3, teacher=teacher, chunk_seconds=CHUNK,
                          overlap_seconds=OVERLAP, batch_windows=4)
    assert torch.equal(batched.semantic_codes, out.semantic_codes) and torch.equal(batched.token_lengths, out.token_lengths)
    # Decoding: whole-file length, finite, and close to decoding the same tokens in one pass.
    a, b = decode_long(codec, out, None, CHUNK, OVERLAP), codec.decode(out)
    assert a.audio.shape == b.audio.shape == (1, 1, wav.numel()) and torch.isfinite(a.audio).all()


def test_local_model_differs_only_at_seams(local):
    """With no attention anywhere, chunked codes equal whole-file codes except for frames near a seam: at a seam the
    grouping restarts (σ_k is a token start of window k) and the ConvNeXt / DAC-encoder context is cut."""
    codec, teacher = local
    n = _clean_length(14.0)
    wav = tones(n / 16000, seed=5)[:n]
    ref = whole(codec, teacher, wav)
    out = encode_long(codec, wav, 16000, 0.91, 3, teacher=teacher, chunk_seconds=CHUNK, overlap_seconds=OVERLAP)
    T = int(ref.num_frames)
    assert int(out.num_frames) == T
    W, O = _window_frames(codec, CHUNK, OVERLAP)
    plan = plan_windows(T, W, O)
    seams = torch.tensor([(s1 + e0) // 2 for (_, e0), (s1, _) in zip(plan, plan[1:])])
    dist = (torch.arange(T)[:, None] - seams[None]).abs().min(1).values
    sem_a, ac_a = per_frame(ref)
    sem_b, ac_b = per_frame(out)
    far = dist >= 16  # two full-length tokens away from every seam
    assert bool(far.any()) and bool((~far).any())
    assert torch.equal(sem_a[far], sem_b[far]) and torch.equal(ac_a[:, far], ac_b[:, far])

    # Decoding the same tokens in windows: identical audio away from the seams, close near them. The DAC decoder
    # sees ~±13 frames (dilated convs at 25 Hz), so these windows keep 25 frames of context on each side.
    W, O = _window_frames(codec, 8.4, 4.0)
    a = decode_long(codec, out, None, 8.4, 4.0, crossfade_seconds=0.5).audio[0, 0]
    b = codec.decode(out).audio[0, 0]
    plan = plan_windows(T, W, O)
    assert len(plan) >= 2
    seams = torch.tensor([(s1 + e0) // 2 for (_, e0), (s1, _) in zip(plan, plan[1:])])
    dist = (torch.arange(a.numel())[:, None] // codec.hop_length - seams[None]).abs().min(1).values
    far = dist >= 4  # outside the 0.5 s cross-fades (±3 frames)
    torch.testing.assert_close(a[far], b[far], rtol=0, atol=1e-5)
    assert float((a - b).abs().max()) < 0.05 * float(b.abs().max())
