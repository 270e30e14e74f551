#!/usr/bin/env python
"""Benchmark FlexiCodec encode + decode at the released dimensions (random weights), against the official code.

    python tools/bench_codec.py                      # batch 16 × 6 s, CPU fp32, official code in the same run
    python tools/bench_codec.py --batch 2 --seconds 2 --repeats 1 --official none
    python tools/bench_codec.py --device cuda --batch 64 --seconds 10 --dtype bf16 --official-dtype bf16 --compile

Teacher (SenseVoice) features are given as input, τ = 0.91, 8 quantizers. RTF = wall time /
audio duration (lower is faster). The official ``FlexiCodec`` (``--official auto``: the ``flexicodec==0.1.2``
package, installed ``--no-deps`` into ~/.cache/flexitrain on first use; or a folder holding the ``flexicodec``
package, e.g. a checkout of amphionspace/FlexiCodec; ``none`` to skip) is built with the same config, loaded
with the same weights, run on the same inputs, and the codes are compared; its missing heavy dependencies
(funasr, transformers, audiotools, dac) are stubbed — the teacher is not run, so they are not needed.
Each timing is the best of --repeats after a warm-up run (which also autotunes with cudnn.benchmark and
compiles with --compile). The last line is

    bench_codec: ours R1 audio-s/s (RTF) | official R2 audio-s/s | ratio X | codes identical: B | settings
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexitrain.models.codec import RELEASED_CONFIG, FlexiCodec  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def make_inputs(batch: int, seconds: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * 16000)
    wav = torch.randn(batch, n, generator=g) * 0.1
    t_lfr = -(-(1 + (n - 400) // 160) // 6)
    # AR(1) features with a random correlation per frame: neighbour cosine ≈ ρ_t ~ U(0.8, 0.99),
    # so τ = 0.91 starts a token at roughly half the frames (≈ 8 tokens/s, like speech)
    rho = torch.rand(batch, 1, t_lfr, generator=g) * 0.19 + 0.8
    noise = torch.randn(batch, 512, t_lfr, generator=g)
    frames = [noise[..., 0]]
    for t in range(1, t_lfr):
        frames.append(rho[..., t] * frames[-1] + (1 - rho[..., t] ** 2).sqrt() * noise[..., t])
    sem = torch.stack(frames, dim=2)
    return wav, sem


def install_stubs() -> None:
    """Stand-ins for the official code's imports that the codec path does not use."""
    import types

    from torch import nn

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules.setdefault(name, m)
        return sys.modules[name]

    class _Teacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

    class _AutoModel:
        def __init__(self, *a, **k):
            self.model = _Teacher()

    module("funasr", AutoModel=_AutoModel)
    module("transformers", Wav2Vec2BertModel=type("Wav2Vec2BertModel", (nn.Module,), {}))
    module("audiotools", AudioSignal=object)
    module("audiotools.ml", BaseModel=nn.Module)
    try:
        import easydict  # noqa: F401
    except ImportError:
        class EasyDict(dict):
            __getattr__ = dict.__getitem__

            def __setattr__(self, k, v):
                self[k] = v
        module("easydict", EasyDict=EasyDict)
    try:
        import dac.nn.layers  # noqa: F401
    except ImportError:  # descript-audio-codec 1.0.0 dac/nn/layers.py behaviour
        from torch.nn.utils import weight_norm

        @torch.jit.script
        def snake(x, alpha):
            shape = x.shape
            x = x.reshape(shape[0], shape[1], -1)
            x = x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)
            return x.reshape(shape)

        class Snake1d(nn.Module):
            def __init__(self, channels):
                super().__init__()
                self.alpha = nn.Parameter(torch.ones(1, channels, 1))

            def forward(self, x):
                return snake(x, self.alpha)

        module("dac")
        module("dac.nn")
        module("dac.nn.layers", WNConv1d=lambda *a, **k: weight_norm(nn.Conv1d(*a, **k)),
               WNConvTranspose1d=lambda *a, **k: weight_norm(nn.ConvTranspose1d(*a, **k)), Snake1d=Snake1d)
    try:
        import torchaudio.functional.functional  # noqa: F401
    except Exception:
        module("torchaudio")
        module("torchaudio.functional")
        module("torchaudio.functional.functional", _hz_to_mel=None, _mel_to_hz=None)


OFFICIAL_VERSION = "0.1.2"


def official_package_dir() -> Path:
    """A ``pip --target`` folder holding flexicodec==0.1.2: ``$FLEXICODEC_OFFICIAL``, or ~/.cache/flexitrain/...,
    installed there with ``pip --no-deps`` on first use. RuntimeError (saying why) when it cannot be had."""
    def holds(d: Path) -> bool:
        return (d / f"flexicodec-{OFFICIAL_VERSION}.dist-info").is_dir() and (d / "flexicodec").is_dir()

    env = os.environ.get("FLEXICODEC_OFFICIAL")
    if env:
        if not holds(Path(env)):
            raise RuntimeError(f"FLEXICODEC_OFFICIAL={env} holds no flexicodec {OFFICIAL_VERSION}")
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flexitrain" / \
        f"flexicodec-{OFFICIAL_VERSION}"
    if not holds(cache):
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(cache),
               f"flexicodec=={OFFICIAL_VERSION}"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"could not install flexicodec=={OFFICIAL_VERSION}: {e}") from None
        if res.returncode != 0 or not holds(cache):
            raise RuntimeError(f"could not install flexicodec=={OFFICIAL_VERSION}: {res.stderr.strip()[-300:]}")
    return cache


def build_official(src: Path, config: dict, state: dict):
    install_stubs()
    sys.path.insert(0, str(src))
    import importlib
    import os

    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    mod = importlib.import_module("flexicodec.modeling_flexicodec")
    model = mod.FlexiCodec(**{**config, "semantic_model_path": "unused"})
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith("semantic_model.")]
    if bad or unexpected:
        raise RuntimeError(f"official model keys differ: missing {bad[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def _settings(args, compiled: list[str]) -> str:
    cudnn = bool(torch.backends.cudnn.benchmark) if args.device.startswith("cuda") else "n/a"
    tf32 = torch.backends.cuda.matmul.allow_tf32 if args.device.startswith("cuda") else "n/a"
    return (f"device={args.device} dtype={args.dtype} official_dtype={args.official_dtype} "
            f"threads={torch.get_num_threads()} batch={args.batch} seconds={args.seconds} tau={args.threshold} "
            f"nq={args.num_quantizers} cudnn.benchmark={cudnn} tf32={tf32} "
            f"compile={'+'.join(compiled) if compiled else 'off'} sync_free={args.device != 'cpu'}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--threshold", type=float, default=0.91)
    ap.add_argument("--num-quantizers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="best of N timed runs (after one warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="ours; bf16 = autocast (GPU)")
    ap.add_argument("--official-dtype", default="fp32", choices=["fp32", "bf16"], help="the official code's")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--official", default="auto",
                    help="auto (flexicodec==0.1.2 from the package index), none, or a folder holding `flexicodec`")
    ap.add_argument("--official-src", type=Path, help="alias of --official PATH (a checkout of FlexiCodec)")
    ap.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.backends.cudnn.benchmark for both codecs (default: on with CUDA; fixed shapes here)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile our DAC encoder/decoder and bottleneck (fixed shapes; compiles on the warm-up)")
    ap.add_argument("--compile-snake", action="store_true",
                    help="opt-in: torch.compile the inference Snake (needs a C++ compiler; compiles on the warm-up)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    torch.backends.cudnn.benchmark = cuda if args.cudnn_benchmark is None else args.cudnn_benchmark
    if args.compile_snake:
        from flexitrain.models.codec.layers import enable_compiled_snake

        enable_compiled_snake()
    official_dir = args.official_src
    if official_dir is None and args.official != "none":
        try:
            official_dir = official_package_dir() if args.official == "auto" else Path(args.official)
        except RuntimeError as e:
            print(f"official code not run: {e}")

    torch.manual_seed(0)
    model = FlexiCodec(**RELEASED_CONFIG).eval().to(args.device)
    compiled = []
    if args.compile:
        from flexitrain.tasks.compiling import codec_inference_targets, compile_options, compile_modules

        compiled = compile_modules(codec_inference_targets(model), compile_options(True))
    wav, sem = make_inputs(args.batch, args.seconds)
    wav, sem = wav.to(args.device), sem.to(args.device)
    audio_s = args.batch * args.seconds

    def amp(dtype: str):
        return torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16")

    def run(masked: bool):
        def encode():
            with amp(args.dtype):
                return model.encode(wav, threshold=args.threshold, num_quantizers=args.num_quantizers,
                                    semantic_features=sem, use_padding_mask=masked)

        with torch.no_grad():
            tokens = encode()  # warm-up

            def decode():
                with amp(args.dtype):
                    return model.decode_codes(tokens.semantic_codes, tokens.acoustic_codes, tokens.token_lengths,
                                              use_padding_mask=masked)

            decode()
            t_enc, tokens = timed(encode, args.device, args.repeats)
            t_dec, audio = timed(decode, args.device, args.repeats)
        return t_enc, t_dec, tokens, audio

    print(_settings(args, compiled))
    results = {}
    for masked in (True, False) if official_dir is not None else (True,):
        t_enc, t_dec, tokens, audio = results[masked] = run(masked)
        name = "flexitrain (padding masks, default API)" if masked else "flexitrain (official-compatible, no masks)"
        print(f"{name}: encode {t_enc:.3f} s, decode {t_dec:.3f} s, total {t_enc + t_dec:.3f} s, "
              f"RTF {(t_enc + t_dec) / audio_s:.4f} (encode {t_enc / audio_s:.4f}, decode {t_dec / audio_s:.4f}); "
              f"tokens/s {float(tokens.frame_rate.mean()):.2f}")
    m_total = sum(results[True][:2])
    out = {"settings": _settings(args, compiled), "ours_audio_s_per_s": audio_s / m_total, "ours_rtf": m_total / audio_s}

    if official_dir is not None:
        t_enc, t_dec, tokens, _ = results[False]
        official = build_official(official_dir, RELEASED_CONFIG, model.codec_state_dict()).to(args.device)
        x_wav = wav[:, None]

        def off_encode():
            with amp(args.official_dtype):
                return official.forward_features(x_wav, 16000, n_quantizers=args.num_quantizers, semantic_repr=sem,
                                                 alignment_hidden=sem, encode_only=True,
                                                 manual_threshold=args.threshold)

        with torch.no_grad():
            enc = off_encode()

            def off_decode():
                with amp(args.official_dtype):
                    return official.decode_from_codes(enc.semantic_codes, enc.acoustic_codes, enc.token_lengths)

            off_decode()
            o_enc, enc = timed(off_encode, args.device, args.repeats)
            o_dec, o_audio = timed(off_decode, args.device, args.repeats)
            # our decoder on the official codes (incl. its codes for padded groups) → same audio
            with amp(args.dtype):
                audio = model.decode_codes(enc.semantic_codes, enc.acoustic_codes, enc.token_lengths,
                                           use_padding_mask=False)
        # the official code leaves codes in padded groups; ours zeroes them: compare valid tokens
        valid = tokens.token_lengths > 0
        same = torch.equal(enc.token_lengths, tokens.token_lengths) and \
            torch.equal(enc.semantic_codes[:, 0].long()[valid], tokens.semantic_codes[valid]) and \
            torch.equal(enc.acoustic_codes.transpose(1, 2)[valid], tokens.acoustic_codes.transpose(1, 2)[valid])
        diff = float((o_audio.float() - audio.float()).abs().max()) if o_audio.shape == audio.shape else float("nan")
        print(f"official: encode {o_enc:.3f} s, decode {o_dec:.3f} s, total {o_enc + o_dec:.3f} s, "
              f"RTF {(o_enc + o_dec) / audio_s:.4f}")
        print(f"speed-up (official-compatible path): encode {o_enc / t_enc:.2f}x, decode {o_dec / t_dec:.2f}x, "
              f"total {(o_enc + o_dec) / (t_enc + t_dec):.2f}x; identical codes: {same}; "
              f"max |Δaudio| (same codes) {diff:.2e}")
        print(f"speed-up (padding-masked default API): total {(o_enc + o_dec) / m_total:.2f}x")
        out.update(official_audio_s_per_s=audio_s / (o_enc + o_dec), ratio=(o_enc + o_dec) / m_total,
                   codes_identical=same, max_audio_diff=diff)
    official_part = (f"official {out['official_audio_s_per_s']:.1f} audio-s/s | ratio {out['ratio']:.2f}x | "
                     f"codes identical: {out['codes_identical']}" if "ratio" in out else "official not run")
    print(f"bench_codec: ours {out['ours_audio_s_per_s']:.1f} audio-s/s (RTF {out['ours_rtf']:.4f}) | "
          f"{official_part} | {out['settings']}")
    return out


if __name__ == "__main__":
    main()
