"""Encode / decode speech of any length with memory bounded by the window size, not by the input length.

Why: the teacher (SenseVoice), the query-token aggregators and the bottleneck transformer attend over the whole
input, so one ``FlexiCodec.encode`` / ``decode`` call grows in memory with the length (quadratically in attention).
Here the model only ever sees windows of at most ``chunk_seconds``; the waveform (4 bytes/sample) and the tokens (a
few integers per 80 ms frame) are the only buffers that scale with the length.

Windows (frames are the codec's 80 ms frames; T = frames of the whole input; W, O = chunk / overlap frames):
  window k covers frames [s_k, e_k): s_k = k(W - O), e_k = s_k + W, except the last, which ends at the end of the
  input and starts at the first multiple of ``ALIGN_FRAMES`` >= T - W (a full-size window, overlapping its
  neighbour by O frames or more). Starts are multiples of ALIGN_FRAMES = 3 frames (240 ms = 4 SenseVoice LFR
  frames), so a window's teacher frames fall on the whole file's grid. Input of at most W frames: one window.

Encoding seams (token stitching), exactly:
  nominal seam a_k = (s_k + e_{k-1}) // 2, the middle of the overlap of windows k-1 and k;
  actual seam σ_k = the first token start of window k at or after a_k  (σ_0 = 0, σ_K = T);
  window k contributes its tokens that start in [σ_k, σ_{k+1}); the last of them is cut to end at σ_{k+1}.
  The kept tokens tile [0, T) once each (no duplicate, no gap); every length stays in [1, max_tokens_per_group];
  only the token just before a seam can be shorter than the group it was coded from (its codes are kept).
  T = s_{K-1} + (frames of the last window), which equals the whole-file frame count for a SenseVoice teacher
  (starts on the LFR grid). One window: the codes are exactly ``FlexiCodec.encode``'s.

Decoding: token windows = the tokens whose start frame lies in [s_k, e_k) of the same window plan over T; each is
decoded alone (``decode_codes``), and neighbours are cross-faded linearly over ``crossfade_seconds`` centred in
their overlap (same tokens on both sides, so the two signals are close: an amplitude-complementary fade). One
window: the audio is exactly ``FlexiCodec.decode``'s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .flexicodec import CodecAudio, CodecTokens, FlexiCodec, resample

ALIGN_FRAMES = 3  # lcm(80 ms codec hop, 60 ms SenseVoice LFR stride) / 80 ms

__all__ = ["ALIGN_FRAMES", "plan_windows", "encode_long", "encode_long_batch", "decode_long"]


def _window_frames(codec: FlexiCodec, chunk_seconds: float, overlap_seconds: float) -> tuple[int, int]:
    """(W, O) in frames, W a multiple of ALIGN_FRAMES; checks the seams fit (see the module docstring)."""
    cap = codec.max_tokens_per_group or 1
    W = int(chunk_seconds * codec.frame_rate) // ALIGN_FRAMES * ALIGN_FRAMES
    O = -(-int(round(overlap_seconds * codec.frame_rate)) // ALIGN_FRAMES) * ALIGN_FRAMES  # stride stays aligned
    # σ_k <= a_k + cap - 1 must lie inside window k-1 (which may lose 2 end frames to the teacher's frame count):
    # half an overlap must exceed cap + 1 frames.
    min_o = 2 * (cap + 2)
    if O < min_o:
        raise ValueError(f"overlap_seconds={overlap_seconds} is too short: at least {min_o / codec.frame_rate:g} s "
                         f"({min_o} frames, twice max_tokens_per_group + 4) so that seams fall inside both windows")
    if W < 2 * O:
        raise ValueError(f"chunk_seconds={chunk_seconds} must be at least twice overlap_seconds={overlap_seconds}")
    return W, O


def plan_windows(num_frames: int, W: int, O: int) -> list[tuple[int, int]]:
    """[(start, end)] frame windows covering [0, num_frames) (module docstring)."""
    if num_frames <= W:
        return [(0, num_frames)]
    stride = W - O
    K = 1 + math.ceil((num_frames - W) / stride)
    windows = [(k * stride, k * stride + W) for k in range(K - 1)]
    last = -(-(num_frames - W) // ALIGN_FRAMES) * ALIGN_FRAMES  # > the previous start, <= (K-1)·stride
    windows.append((last, num_frames))
    return windows


@dataclass
class _WindowTokens:
    start: int  # first frame of the window in the file
    nominal_end: int  # planned end frame (e_k)
    semantic: torch.Tensor  # [C, n] FSQ codes of the n valid tokens
    acoustic: torch.Tensor | None  # [Q, n]
    lengths: torch.Tensor  # [n] frames per token
    num_frames: int
    bits_per_token: float


def _encode_windows(codec, teacher, audio: torch.Tensor, lengths: torch.Tensor, threshold, num_quantizers):
    """One batched ``codec.encode`` over windows ``[B, 1, n]`` at the codec rate -> per-window token slices."""
    semantic = semantic_lengths = None
    if teacher is not None:  # as the evaluation code: features from a separately loaded teacher
        semantic, semantic_lengths = teacher(audio[:, 0], lengths)
    # sync_free: the token axis is as long as the frame axis while computing, so every full window has the same
    # shapes (CPU convolution libraries cache a kernel per shape: varying token counts would grow memory with the
    # number of windows); the codes are the same.
    out = codec.encode(audio, lengths, sample_rate=codec.sample_rate, threshold=threshold,
                       num_quantizers=num_quantizers, semantic_features=semantic, semantic_lengths=semantic_lengths,
                       sync_free=semantic is not None)
    sem = out.semantic_codes if out.semantic_codes.dim() == 3 else out.semantic_codes.unsqueeze(1)
    bits = (out.bitrate / out.frame_rate.clamp(min=1e-12)).tolist()
    num, frames = out.num_tokens.tolist(), out.num_frames.tolist()
    return [(sem[i, :, :num[i]].cpu(), None if out.acoustic_codes is None else out.acoustic_codes[i, :, :num[i]].cpu(),
             out.token_lengths[i, :num[i]].cpu(), frames[i], bits[i]) for i in range(audio.shape[0])]


def _stitch(windows: list[_WindowTokens], num_samples: int, sample_rate: int, codec_samples: int,
            codec_rate: int) -> CodecTokens:
    """Seam rule of the module docstring; returns a batch-of-one CodecTokens."""
    T = windows[-1].start + windows[-1].num_frames
    starts = [w.start + torch.cumsum(w.lengths, 0) - w.lengths for w in windows]
    sigma = [0]
    for k in range(1, len(windows)):
        a = (windows[k].start + windows[k - 1].nominal_end) // 2
        i = int(torch.searchsorted(starts[k], torch.tensor(a)))
        if i == len(starts[k]) or int(starts[k][i]) > windows[k - 1].start + windows[k - 1].num_frames:
            raise RuntimeError(f"no seam near frame {a}: window overlap too short for this model")
        sigma.append(int(starts[k][i]))
    sigma.append(T)
    sem, ac, lens = [], [], []
    for k, w in enumerate(windows):
        keep = (starts[k] >= sigma[k]) & (starts[k] < sigma[k + 1])
        sem.append(w.semantic[:, keep])
        if w.acoustic is not None:
            ac.append(w.acoustic[:, keep])
        lens.append(torch.minimum(w.lengths[keep], sigma[k + 1] - starts[k][keep]))  # cut the token before a seam
    lengths = torch.cat(lens)
    if int(lengths.sum()) != T or bool((lengths <= 0).any()):
        raise RuntimeError("internal error: stitched tokens do not tile the input")  # cannot happen (docstring)
    G = lengths.numel()
    semantic = torch.cat(sem, 1)[None]
    semantic = semantic[:, 0] if semantic.shape[1] == 1 else semantic
    acoustic = torch.cat(ac, 1)[None] if ac else None
    frame_rate = torch.tensor([G / (codec_samples / codec_rate)], dtype=torch.float32)
    return CodecTokens(semantic, acoustic, lengths[None], torch.tensor([G]), torch.tensor([T]),
                       torch.tensor([num_samples]), int(sample_rate), frame_rate, frame_rate * windows[0].bits_per_token)


@torch.no_grad()
def encode_long_batch(codec: FlexiCodec, wavs: list[torch.Tensor], sample_rates: list[int] | int = 16000,
                      threshold: float = 0.91, num_quantizers: int | None = 8, teacher=None,
                      chunk_seconds: float = 30.0, overlap_seconds: float = 4.0,
                      batch_windows: int = 1) -> list[CodecTokens | Exception]:
    """Encode mono waveforms ``[N]`` of any length, ``batch_windows`` windows (of any items) per model call.

    Returns one batch-of-one :class:`CodecTokens` per input, or the exception that input raised (a batch that fails
    is rerun window by window, so one bad input does not sink the others). ``teacher``: a separately loaded semantic
    teacher ``(wav [B, N], lengths) -> (features, lengths)``; None runs the codec's own.
    """
    W, O = _window_frames(codec, chunk_seconds, overlap_seconds)
    hop, device = codec.hop_length, next(codec.parameters()).device
    rates = [sample_rates] * len(wavs) if isinstance(sample_rates, int) else list(sample_rates)
    results: list = [None] * len(wavs)
    audio16, jobs = {}, []  # jobs: (item, window index, start frame, nominal end frame, samples)
    for i, (wav, sr) in enumerate(zip(wavs, rates)):
        try:
            x = torch.as_tensor(wav, dtype=torch.float32).reshape(1, 1, -1).to(device)
            if x.shape[-1] == 0:
                raise ValueError("empty audio")
            # Resample the whole input exactly as FlexiCodec.encode does (values and length).
            x16, n16 = resample(x, torch.tensor([x.shape[-1]], device=device), sr, codec.sample_rate)
            audio16[i] = x16[0, 0, : int(n16)]
            n = audio16[i].numel()
            for k, (s, e) in enumerate(plan_windows(-(-n // hop), W, O)):
                jobs.append((i, k, s, e, min(e * hop, n) - s * hop))
        except Exception as err:  # noqa: BLE001 -- reported per input by the caller
            results[i] = err
    per_item: dict[int, dict[int, _WindowTokens]] = {i: {} for i in audio16}

    def run(batch):
        n = max(j[4] for j in batch)
        x = torch.zeros(len(batch), 1, n, device=device)
        for b, (i, _, s, _, m) in enumerate(batch):  # per window (not per frame): assembling the batch
            x[b, 0, :m] = audio16[i][s * hop: s * hop + m]
        lengths = torch.tensor([j[4] for j in batch], device=device)
        for (i, k, s, e, _), (sem, ac, lens, frames, bits) in zip(
                batch, _encode_windows(codec, teacher, x, lengths, threshold, num_quantizers)):
            per_item[i][k] = _WindowTokens(s, e, sem, ac, lens, frames, bits)

    jobs.sort(key=lambda j: -j[4])  # similar lengths together: little padding
    for b in range(0, len(jobs), max(1, batch_windows)):
        batch = [j for j in jobs[b: b + max(1, batch_windows)] if results[j[0]] is None]
        if not batch:
            continue
        try:
            run(batch)
        except Exception:  # noqa: BLE001 -- isolate the input that fails
            for j in batch:
                if results[j[0]] is None:
                    try:
                        run([j])
                    except Exception as err:  # noqa: BLE001
                        results[j[0]] = err
    for i, windows in per_item.items():
        if results[i] is not None:
            continue
        try:
            ordered = [windows[k] for k in sorted(windows)]
            results[i] = _stitch(ordered, int(torch.as_tensor(wavs[i]).numel()), rates[i], audio16[i].numel(),
                                 codec.sample_rate)
        except Exception as err:  # noqa: BLE001
            results[i] = err
    return results


def encode_long(codec: FlexiCodec, wav: torch.Tensor, sample_rate: int = 16000, threshold: float = 0.91,
                num_quantizers: int | None = 8, teacher=None, chunk_seconds: float = 30.0,
                overlap_seconds: float = 4.0, batch_windows: int = 1) -> CodecTokens:
    """One mono waveform ``[N]`` of any length -> batch-of-one :class:`CodecTokens` (errors are raised)."""
    (out,) = encode_long_batch(codec, [wav], sample_rate, threshold, num_quantizers, teacher, chunk_seconds,
                               overlap_seconds, batch_windows)
    if isinstance(out, Exception):
        raise out
    return out


@torch.no_grad()
def decode_long(codec: FlexiCodec, tokens: CodecTokens, sample_rate: int | None = None, chunk_seconds: float = 30.0,
                overlap_seconds: float = 4.0, crossfade_seconds: float = 1.0) -> CodecAudio:
    """Batch-of-one tokens (e.g. from :func:`encode_long`) -> waveform at ``sample_rate`` (default: the input's),
    trimmed to the encoded length, as ``FlexiCodec.decode``."""
    if tokens.token_lengths.shape[0] != 1:
        raise ValueError("decode_long takes the tokens of one utterance (batch of one)")
    W, O = _window_frames(codec, chunk_seconds, overlap_seconds)
    device, hop = next(codec.parameters()).device, codec.hop_length
    sem = tokens.semantic_codes if tokens.semantic_codes.dim() == 3 else tokens.semantic_codes.unsqueeze(1)
    n = int(tokens.num_tokens[0])
    lengths = tokens.token_lengths[0, :n].long().cpu()
    sem, ac = sem[:, :, :n], None if tokens.acoustic_codes is None else tokens.acoustic_codes[:, :, :n]
    starts = torch.cumsum(lengths, 0) - lengths
    T = int(lengths.sum())
    plan = plan_windows(T, W, O)
    fade = max(1, int(crossfade_seconds * codec.sample_rate))
    # Each window is decoded and added into one output buffer at once (no list of decoded windows, no
    # full-length copies): memory stays one window of work plus the output itself, whatever the length.
    bounds = [tuple(int(v) for v in torch.searchsorted(starts, torch.tensor([s, e]))) for s, e in plan]
    firsts = [int(starts[lo]) * hop for lo, _ in bounds]  # first sample of each window's audio
    out, fade_in = None, None
    cap = max(1, int(codec.max_tokens_per_group or 1))  # a window's tokens cover at most W + cap frames
    for k, (lo, hi) in enumerate(bounds):
        if len(bounds) == 1:
            out = codec.decode_codes(sem.to(device), None if ac is None else ac.to(device),
                                     lengths[None].to(device)).float()[0, 0]
            break
        # Every window padded to the same shapes, W tokens (empty ones) over W + cap frames (masked), so the CPU
        # convolution kernels cached per shape are reused instead of piling up with the number of windows.
        pad, frames = W - (hi - lo), int(lengths[lo:hi].sum())
        y = codec.decode_codes(F.pad(sem[..., lo:hi], (0, pad)).to(device),
                               None if ac is None else F.pad(ac[..., lo:hi], (0, pad)).to(device),
                               F.pad(lengths[None, lo:hi], (0, pad)).to(device), num_frames=W + cap).float()[0, 0]
        y = y[: y.numel() - (W + cap - frames) * hop]  # the window's own samples (the rest is masked padding)
        if out is None:
            out = y.new_zeros(T * hop)  # the decoder gives hop * frames - δ samples per window: it fits
        a = firsts[k]
        fade_out = _fade_span(a, y.numel(), firsts[k + 1], fade) if k + 1 < len(bounds) else None
        out[a: a + y.numel()] += _window_weights(a, y.numel(), fade_in, fade_out, y.device) * y
        fade_in = fade_out
    audio = out.reshape(1, 1, -1)
    # As FlexiCodec.decode: trim / pad to the encoded length at the codec rate, then resample.
    n16 = int(round(int(tokens.num_samples[0]) * codec.sample_rate / tokens.sample_rate))
    audio = _fit(audio, n16)
    out_sr = tokens.sample_rate if sample_rate is None else int(sample_rate)
    audio, out_len = resample(audio, torch.tensor([n16], device=audio.device), codec.sample_rate, out_sr)
    if out_sr == tokens.sample_rate:
        out_len = tokens.num_samples.to(audio.device)
        audio = _fit(audio, int(out_len[0]))
    return CodecAudio(audio, out_len, out_sr)


def _fit(audio: torch.Tensor, n: int) -> torch.Tensor:
    """Trim (a view) or zero-pad the last axis to ``n`` samples; no copy when nothing changes."""
    if audio.shape[-1] >= n:
        return audio[..., :n]
    return F.pad(audio, (0, n - audio.shape[-1]))


def _fade_span(a0: int, n0: int, a1: int, fade: int) -> tuple[int, int]:
    """(start, length) of the linear fade between a window at ``a0`` of ``n0`` samples and the next at ``a1``:
    up to ``fade`` samples, centred in their overlap."""
    overlap = a0 + n0 - a1
    f = max(1, min(fade, overlap))
    return a1 + (overlap - f) // 2, f


def _window_weights(a: int, n: int, fade_in, fade_out, device) -> torch.Tensor:
    """Overlap-add weights of a window's samples a .. a+n-1: the fade-out of one window and the fade-in of the
    next sum to 1 at every sample."""
    t = torch.arange(a, a + n, device=device, dtype=torch.float32)
    w = torch.ones_like(t)
    if fade_in is not None:
        f0, f = fade_in
        w = w * ((t - f0 + 0.5) / f).clamp(0, 1)
    if fade_out is not None:
        f0, f = fade_out
        w = w * (1 - (t - f0 + 0.5) / f).clamp(0, 1)
    return w
