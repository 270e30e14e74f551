#!/usr/bin/env python
"""Training throughput of CodecTask: generator steps/s and audio-seconds/s (GAN steps, i.e. G + D updates).

    python tools/bench_train.py                               # the codec_demo recipe's model on CPU
    python tools/bench_train.py --recipe codec_12hz --device cuda --precision bf16-mixed --batch 8 --seconds 6

Random audio of the given shape, teacher features from the recipe's teacher (random for the demo). With CUDA it
also prints the model FLOPs utilisation (forward+backward FLOPs counted by torch.utils.flop_counter).
"""
from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from hydra.utils import instantiate

from flexitrain.utils.config import compose


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="codec_demo")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100 SXM dense bf16: 989)")
    ap.add_argument("overrides", nargs="*", help="extra config overrides, e.g. task.disc_start_step=0")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose([f"recipe={args.recipe}", "task.teacher.model_dir=null", "task.teacher.random_init=true",
                   "task.disc_start_step=0", *args.overrides])
    task = instantiate(cfg.task, _recursive_=False)
    sr = task.generator.sample_rate
    n = int(args.seconds * sr)
    g = torch.Generator().manual_seed(0)
    batch = {"audio": 0.1 * torch.randn(args.batch, 1, n, generator=g), "lengths": torch.full((args.batch,), n)}
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *a):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_train_batch_end(self, *a):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    steps = args.steps + 2
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1, max_steps=steps,
                        precision=args.precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()])
    trainer.fit(task, train_dataloaders=loader)
    warm = times[2:]
    step = sum(warm) / len(warm)
    audio_s = args.batch * args.seconds
    print(f"recipe {args.recipe} | {args.device} {args.precision} | threads {torch.get_num_threads()} | "
          f"batch {args.batch} x {args.seconds:g} s | generator {sum(p.numel() for p in task.generator.parameters()) / 1e6:.1f} M params")
    print(f"step {step * 1000:.0f} ms | {1 / step:.2f} steps/s | {audio_s / step:.1f} audio-s/s")
    if args.device.startswith("cuda"):
        from torch.utils.flop_counter import FlopCounterMode

        task = task.to(args.device)
        b = {k: v.to(args.device) for k, v in batch.items()}
        with FlopCounterMode(display=False) as fc, torch.autocast("cuda", torch.bfloat16,
                                                                 enabled="bf16" in args.precision):
            terms, *_ = task.generator_losses(b, 0.9, False)
            sum(terms.values()).backward()
        flops = fc.get_total_flops()
        print(f"generator fwd+bwd {flops / 1e12:.2f} TFLOP/step | MFU {flops / step / (args.peak_tflops * 1e12) * 100:.1f} %")


if __name__ == "__main__":
    main()
