#!/usr/bin/env python
"""SenseVoice front end throughput: flexitrain's batched torch front end vs the official per-item path.

    python tools/bench_frontend.py [--batch 16] [--seconds 6] [--repeats 5] [--threads N] [--funasr]

Compared, on the same batch of random 16 kHz audio (dither 0, CPU, float32):
- ``flexitrain``: ``SenseVoiceFrontend`` (one unfold + rfft for the whole padded batch, gather-based LFR).
- ``official (loop LFR)``: a faithful re-statement of what FlexiCodec's ``FBankGen`` -> FunASR ``WavFrontend``
  runs per item: ``torchaudio.compliance.kaldi.fbank`` (its steps, including rebuilding the mel banks and
  window on every call), the Python-loop ``apply_lfr`` of FunASR <= 1.2, ``apply_cmvn``, then ``pad_sequence``.
- ``official (strided LFR)``: the same with FunASR 1.4's ``as_strided`` ``apply_lfr``.
- ``--funasr``: also FunASR's real ``WavFrontend`` if funasr is importable (run with a venv that has it;
  without torchaudio its fbank is kaldi-native-fbank).
Prints seconds per batch (best of --repeats), real-time factor and the speed ratios.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flexitrain.models.sensevoice.frontend import SenseVoiceFrontend  # noqa: E402

EPS = torch.finfo(torch.float32).eps


# ---- faithful per-item re-statement of torchaudio.compliance.kaldi.fbank (the options FunASR passes) ----
def _mel_banks(num_bins, n_fft, fs, low=20.0, high=0.0):
    nyq = 0.5 * fs
    high = high + nyq if high <= 0 else high
    width = fs / n_fft
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    lo_m, hi_m = mel(low), mel(high)
    delta = (hi_m - lo_m) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left, center, right = lo_m + b * delta, lo_m + (b + 1.0) * delta, lo_m + (b + 2.0) * delta
    m = (1127.0 * (1.0 + (width * torch.arange(n_fft / 2)) / 700.0).log()).unsqueeze(0)
    up, down = (m - left) / (center - left), (right - m) / (right - center)
    return torch.max(torch.zeros(1), torch.min(up, down))


def official_fbank(wav: torch.Tensor, frame_length=25.0, frame_shift=10.0, fs=16000, n_mels=80) -> torch.Tensor:
    shift, size = int(fs * frame_shift * 0.001), int(fs * frame_length * 0.001)
    n_fft = 1 << (size - 1).bit_length()
    n = wav.shape[-1]
    frames_n = 1 + (n - size) // shift
    x = wav.as_strided((frames_n, size), (shift * wav.stride(-1), wav.stride(-1)))
    x = x - x.mean(dim=1).unsqueeze(1)
    torch.max(x.pow(2).sum(1), torch.tensor(EPS)).log()  # raw log-energy: torchaudio computes it, unused here
    prev = F.pad(x.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)
    x = x - 0.97 * prev[:, :-1]
    x = x * torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46).unsqueeze(0)
    x = F.pad(x.unsqueeze(0), (0, n_fft - size)).squeeze(0)
    spec = torch.fft.rfft(x).abs().pow(2.0)
    banks = F.pad(_mel_banks(n_mels, n_fft, fs), (0, 1))
    return torch.max(torch.mm(spec, banks.T), torch.tensor(EPS)).log()


def apply_lfr_loop(inputs, lfr_m=7, lfr_n=6):  # FunASR <= 1.2 (and older FlexiCodec environments)
    out = []
    t = inputs.shape[0]
    t_lfr = int(np.ceil(t / lfr_n))
    inputs = torch.vstack((inputs[0].repeat((lfr_m - 1) // 2, 1), inputs))
    t = t + (lfr_m - 1) // 2
    for i in range(t_lfr):
        if lfr_m <= t - i * lfr_n:
            out.append(inputs[i * lfr_n: i * lfr_n + lfr_m].view(1, -1))
        else:
            frame = inputs[i * lfr_n:].view(-1)
            for _ in range(lfr_m - (t - i * lfr_n)):
                frame = torch.hstack((frame, inputs[-1]))
            out.append(frame)
    return torch.vstack(out).type(torch.float32)


def apply_lfr_strided(inputs, lfr_m=7, lfr_n=6):  # FunASR 1.4
    t = inputs.shape[0]
    t_lfr = int(np.ceil(t / lfr_n))
    inputs = torch.vstack((inputs[0].repeat((lfr_m - 1) // 2, 1), inputs))
    t = t + (lfr_m - 1) // 2
    d = inputs.shape[-1]
    last_idx = (t - lfr_m) // lfr_n + 1
    if lfr_m - (t - last_idx * lfr_n) > 0:
        num_padding = (2 * lfr_m - 2 * t + (t_lfr - 1 + last_idx) * lfr_n) / 2 * (t_lfr - last_idx)
        inputs = torch.vstack([inputs] + [inputs[-1:]] * int(num_padding))
    return inputs.as_strided((t_lfr, lfr_m * d), (lfr_n * d, 1)).clone().type(torch.float32)


def official_frontend(wav, lengths, shift, scale, lfr):
    feats = []
    for i in range(wav.shape[0]):
        n = int(lengths[i])
        mat = official_fbank(wav[i, :n] * (1 << 15), frame_length=min(25, n / 16000 * 1000))
        mat = lfr(mat)
        mat = (mat + shift) * scale
        feats.append(mat)
    return pad_sequence(feats, batch_first=True), torch.tensor([f.shape[0] for f in feats])


def time_interleaved(fns: dict, repeats: int) -> dict:
    """Best-of-N seconds per call (least disturbed by other load); the candidates alternate."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--funasr", action="store_true", help="also time FunASR's WavFrontend (needs funasr)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    n = int(args.seconds * 16000)
    wav = torch.randn(args.batch, n, generator=g).mul(0.1).clamp(-1, 1)
    lengths = torch.full((args.batch,), n)
    shift, scale = torch.randn(560, generator=g), torch.rand(560, generator=g) + 0.5
    ours = SenseVoiceFrontend(shift, scale)
    audio_s = args.batch * args.seconds

    with torch.no_grad():
        feats, fl = ours(wav, lengths)
        ref, rl = official_frontend(wav, lengths, shift, scale, apply_lfr_loop)
        assert torch.equal(fl, rl), (fl, rl)
        print(f"max |flexitrain - official| = {(feats - ref).abs().max().item():.2e} over {tuple(feats.shape)}")
        fns = {
            "flexitrain (batched)": lambda: ours(wav, lengths),
            "official (loop LFR)": lambda: official_frontend(wav, lengths, shift, scale, apply_lfr_loop),
            "official (strided LFR)": lambda: official_frontend(wav, lengths, shift, scale, apply_lfr_strided),
        }
        if args.funasr:
            try:
                from funasr.frontends.wav_frontend import WavFrontend
            except ImportError as e:
                print(f"funasr not importable ({e}); skipping")
            else:
                fe = WavFrontend(cmvn_file=None, n_mels=80, frame_length=25, frame_shift=10, lfr_m=7, lfr_n=6, dither=0.0)
                fns["funasr WavFrontend"] = lambda: fe(wav, lengths)
        rows = time_interleaved(fns, args.repeats)

    print(f"front end, batch {args.batch} x {args.seconds:g} s, {torch.get_num_threads()} threads, CPU fp32")
    base = rows["flexitrain (batched)"]
    for name, t in rows.items():
        print(f"  {name:24s} {t * 1000:8.1f} ms/batch   RTF {t / audio_s:.5f}   {audio_s / t:8.0f}x real time   "
              f"{t / base:6.1f}x flexitrain time")
    print(f"speed-up vs official (loop LFR): {rows['official (loop LFR)'] / base:.1f}x")


if __name__ == "__main__":
    main()
