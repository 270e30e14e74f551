"""Peak memory of long-audio encode + decode (flexitrain/models/codec/long_audio.py) against input length.

    python tools/bench_long_audio.py [--seconds 60 600] [--model demo|released] [--device cpu|cuda] [--whole]

Each case runs in a fresh subprocess (CPU peak = ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which includes the
Python/torch baseline; tracemalloc misses torch's allocations; CUDA: ``torch.cuda.max_memory_allocated``) on a seeded
random codec (``demo`` = configs/model/codec_tiny, ``released`` = codec_released) with a random 2-block teacher
and tone+noise input. Prints one JSON line per case and the ratio of the longest to the shortest case's peak
(target: <= 1.2 with chunking). ``--whole`` adds one-pass FlexiCodec.encode / decode cases for comparison.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def case(seconds: float, model: str, device: str, mode: str, chunk: float, overlap: float) -> dict:
    import resource
    import time

    import torch
    from hydra.utils import instantiate

    sys.path.insert(0, str(REPO))
    from flexitrain.models.codec.long_audio import decode_long, encode_long
    from flexitrain.tasks.teacher import build_teacher
    from flexitrain.utils.config import compose

    torch.manual_seed(0)
    codec = instantiate(compose([f"model={'codec_tiny' if model == 'demo' else 'codec_released'}"],
                                return_hydra_config=False).model).eval().to(device)
    teacher = build_teacher({"random_init": True, "num_blocks": 2}).eval().to(device)
    nq = min(8, codec.n_codebooks + 1)
    g = torch.Generator().manual_seed(0)
    n = int(seconds * 16000)
    wav = torch.empty(n)  # filled one second at a time: no full-length temporaries inflate the RSS peak
    for i in range(0, n, 16000):
        t = torch.arange(i, min(n, i + 16000)) / 16000
        wav[i: i + t.numel()] = (0.3 * torch.sin(2 * torch.pi * 220 * t * (1 + 0.1 * torch.sin(t)))
                                 + 0.02 * torch.randn(t.numel(), generator=g))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    with torch.no_grad():
        if mode == "long":
            tokens = encode_long(codec, wav, 16000, 0.91, nq, teacher, chunk, overlap, batch_windows=1)
            audio = decode_long(codec, tokens, None, chunk, overlap).audio
        else:
            x = wav[None].to(device)
            sem, sem_len = teacher(x, torch.tensor([n], device=device))
            tokens = codec.encode(x, threshold=0.91, num_quantizers=nq, semantic_features=sem,
                                  semantic_lengths=sem_len)
            audio = codec.decode(tokens).audio
    out = {"seconds": seconds, "model": model, "mode": mode, "device": device,
           "wall_s": round(time.time() - start, 1), "tokens": int(tokens.num_tokens[0]),
           "samples_out": int(audio.shape[-1]), "baseline_rss_mb": round(base, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, nargs="+", default=[60.0, 600.0])
    p.add_argument("--model", choices=("demo", "released"), default="demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-seconds", type=float, default=30.0)
    p.add_argument("--overlap-seconds", type=float, default=4.0)
    p.add_argument("--whole", action="store_true", help="also one-pass encode/decode (memory grows with length)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--_case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._case:  # child process: one measurement
        import torch

        torch.set_num_threads(args.threads)
        seconds, mode = args._case.split(":")
        print(json.dumps(case(float(seconds), args.model, args.device, mode, args.chunk_seconds,
                              args.overlap_seconds)))
        return []
    results = []
    for mode in ("long", "whole") if args.whole else ("long",):
        for s in args.seconds:
            cmd = [sys.executable, __file__, "--_case", f"{s}:{mode}", "--model", args.model, "--device", args.device,
                   "--chunk-seconds", str(args.chunk_seconds), "--overlap-seconds", str(args.overlap_seconds),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                results.append({"seconds": s, "mode": mode, "error": out.stderr.strip().splitlines()[-1:]})
            else:
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    key = "peak_cuda_mb" if args.device.startswith("cuda") else "peak_rss_mb"
    for mode in ("long", "whole"):
        done = [r for r in results if r.get("mode") == mode and key in r]
        if len(done) >= 2:
            print(f"{mode}: peak {key} {done[-1]['seconds']:g} s / {done[0]['seconds']:g} s = "
                  f"{done[-1][key] / done[0][key]:.3f}")
    return results


if __name__ == "__main__":
    main()
