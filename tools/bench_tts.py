#!/usr/bin/env python
"""NAR (Voicebox flow-matching sampling) and vocoder (Vocos) real-time factors, random weights.

    python tools/bench_tts.py                       # released sizes (NAR 16 x 1024, Vocos 30 x 1024), CPU fp32
    python tools/bench_tts.py --preset tiny --seconds 5
    python tools/bench_tts.py --device cuda --precision bf16

RTF = compute seconds / seconds of generated speech (< 1 is faster than real time). The NAR generates
`--seconds` of speech after a `--prompt-seconds` prompt with `--steps` Euler steps, classifier-free guidance
on (two passes per step, batched), i.e. the settings of the released sampler.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PRESETS = {
    "released": ({}, {}),
    "tiny": ({"hidden_size": 64, "num_layers": 2, "num_heads": 4, "repa_layer_idx": 1},
             {"dim": 64, "intermediate_dim": 192, "num_layers": 2}),
}


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> dict:
    from flexitrain.models.tts.voicebox import VoiceboxNAR
    from flexitrain.models.vocos import Vocos

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="released")
    ap.add_argument("--seconds", type=float, default=4.0, help="generated speech per utterance")
    ap.add_argument("--prompt-seconds", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    nar_kw, voc_kw = PRESETS[args.preset]
    torch.manual_seed(0)
    nar = VoiceboxNAR(**nar_kw).eval().to(device)
    vocoder = Vocos(**voc_kw).eval().to(device)
    n_gen, n_prompt = round(args.seconds * 12.5), round(args.prompt_seconds * 12.5)
    codes = torch.randint(0, nar.config.cond_codebook_size, (n_gen,), device=device)
    prompt_codes = torch.randint(0, nar.config.cond_codebook_size, (n_prompt,), device=device)
    prompt_mel = torch.randn(n_prompt * 4, nar.config.mel_dim, device=device)
    mel = torch.randn(1, nar.config.mel_dim, n_gen * 4, device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext())

    def run_nar():
        with torch.inference_mode(), autocast:
            nar.synthesize(codes, torch.ones_like(codes), prompt_codes, prompt_mel, n_timesteps=args.steps,
                           cfg=args.cfg, seed=0)

    def run_vocoder():
        with torch.inference_mode(), autocast:
            vocoder(mel)

    t_nar, t_voc = timed(run_nar, args.repeats, device), timed(run_vocoder, args.repeats, device)
    n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads")
    out = {"nar_seconds": t_nar, "vocoder_seconds": t_voc, "nar_rtf": t_nar / args.seconds,
           "vocoder_rtf": t_voc / args.seconds}
    print(f"[bench_tts] {args.preset} ({n_params(nar):.1f} M NAR, {n_params(vocoder):.1f} M vocoder), {where}, "
          f"{args.precision}; {args.seconds:g} s generated after a {args.prompt_seconds:g} s prompt")
    print(f"  NAR     {args.steps} Euler steps, cfg {args.cfg:g}: {t_nar:.3f} s  -> RTF {out['nar_rtf']:.3f}")
    print(f"  vocoder {n_gen * 4} mel frames:          {t_voc:.3f} s  -> RTF {out['vocoder_rtf']:.4f}")
    return out


if __name__ == "__main__":
    main()
