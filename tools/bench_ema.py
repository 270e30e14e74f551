#!/usr/bin/env python
"""What weight EMA (`task.ema`) costs a training step: the same benchmark with it off and on, in one process.

    python tools/bench_ema.py                                  # codec_demo on CPU, 3 rounds
    python tools/bench_ema.py --recipe codec_12hz --device cuda --rounds 3 -- --batch 8 --seconds 6

Each round runs `tools/bench_train.py` (the real training_step in a Lightning run; see its docstring) twice,
EMA off then on, alternating the order from round to round so that drift on a shared machine hits both alike;
the EMA run uses `task.ema={decay: 0.999, start_step: 0, every: 1}` (an update at every step from the first,
the most it can cost).  The overhead is the median over rounds of (median step with EMA) / (median step without)
of the same round: a round disturbed by other work on the machine moves one ratio, not the result; the pooled
medians of all steps are printed too.
Separately, `ModelEMA.update` alone is timed on the task's averaged module (median of --update-reps calls
after 5 warm-up calls).  The last line is

    bench_ema: off S0 ms/step | on S1 ms/step | overhead X % (median of rounds) | update alone U ms (Y % of a step)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import bench_train  # noqa: E402  (tools/ is on sys.path when run as a script)

EMA_ON = "task.ema={decay: 0.999, start_step: 0, every: 1}"


def _update_ms(recipe: str, reps: int) -> tuple[float, int]:
    """Median ms of one ModelEMA.update over the recipe task's averaged module (CPU), and its parameter count."""
    from hydra.utils import instantiate

    args = bench_train._parse(["--recipe", recipe, "--device", "cpu", EMA_ON])
    cfg, _kind, _overrides, _notes = bench_train.compose_config(args)
    ema = instantiate(cfg.task, _recursive_=False).ema  # the task's own ModelEMA, on its averaged module
    times = []
    for i in range(5 + reps):
        t0 = time.perf_counter()
        ema.update()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, sum(p.numel() for p in ema.shadow)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="codec_demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--update-reps", type=int, default=50)
    ap.add_argument("bench_args", nargs="*", help="further bench_train arguments, after --")
    args = ap.parse_args(argv)
    base = ["--recipe", args.recipe, "--device", args.device, "--steps", str(args.steps),
            "--warmup", str(args.warmup), *args.bench_args]
    steps, ratios = {"off": [], "on": []}, []
    for r in range(args.rounds):
        medians = {}
        for variant in (("off", "on") if r % 2 == 0 else ("on", "off")):
            res = bench_train.main(base + ([EMA_ON] if variant == "on" else []))
            steps[variant].extend(res["step_ms"]["all"])
            medians[variant] = res["step_ms"]["median"]
            print(f"round {r + 1} EMA {variant}: median {medians[variant]:.1f} ms/step", flush=True)
        ratios.append(medians["on"] / medians["off"])
    off, on = statistics.median(steps["off"]), statistics.median(steps["on"])
    overhead = (statistics.median(ratios) - 1) * 100
    update, params = _update_ms(args.recipe, args.update_reps) if args.device == "cpu" else (float("nan"), 0)
    out = {"recipe": args.recipe, "device": args.device, "threads": torch.get_num_threads(), "rounds": args.rounds,
           "off_ms": off, "on_ms": on, "overhead_pct": overhead, "pooled_overhead_pct": (on / off - 1) * 100,
           "round_ratios": ratios, "update_ms": update,
           "update_pct": update / off * 100, "ema_params": params, "steps": steps}
    print(f"EMA over {params:,} parameters; {len(steps['off'])} timed steps per variant, "
          f"{args.rounds} interleaved rounds, {out['threads']} threads; per-round on/off "
          f"{', '.join(f'{x:.3f}' for x in ratios)}; pooled medians {out['pooled_overhead_pct']:+.1f} %")
    print(f"bench_ema: off {off:.1f} ms/step | on {on:.1f} ms/step | overhead {overhead:+.1f} % (median of rounds) | "
          f"update alone {update:.2f} ms ({out['update_pct']:.1f} % of a step)")
    return out


if __name__ == "__main__":
    main()
