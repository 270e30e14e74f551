"""AR TTS throughput: training (teacher-forced fwd + bwd + AdamW step) and KV-cached sampling, in
speech tokens per second, on CPU or GPU.

    python tools/bench_ar_tts.py --config tiny --device cpu
    python tools/bench_ar_tts.py --config released --device cuda --batch 16 --speech-len 250 --precision bf16

Random weights and inputs (speed does not depend on the values). Sampling runs with EOS disabled up to
--gen-tokens so every run decodes the same number of tokens; `--no-cache` measures full recomputation.
`sampling_batched` decodes --sample-batches utterances at once with `generate_batch` (tokens/s summed
over the batch; prompt lengths vary across items so the left padding is exercised).

Each sampling figure comes from a run after an identical warm-up run (which also compiles / records CUDA
graphs with --compile-step). `syncs_per_token` / `ops_per_token`: a third, untimed run of the same decoding
under `SyncCounter` (host reads of device data and dispatched aten ops; CPU tensors counted as device
tensors; that run is eager, as torch.compile does not trace under a dispatch mode, and the host loop is the
same). The last line is a one-line summary:

    python tools/bench_ar_tts.py --config small --skip-train --compile-step --check-every 16
    SUMMARY config=small device=cpu ... single_tok_s=... batch8_tok_s=... syncs_per_tok=...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexitrain.models.tts.ar_tts import ARTTSModel, released_config, tiny_config  # noqa: E402
from flexitrain.models.tts.sampling import SamplingConfig, generate, generate_batch  # noqa: E402
from flexitrain.utils.dispatch_count import SyncCounter  # noqa: E402

PRESETS = {
    "released": released_config,
    "tiny": lambda: {**tiny_config(), "text_token_size": 51866, "speech_token_size": 32768},
    "small": lambda: {**released_config(), "text_encoder_dim": 512, "llm_dim": 512, "text_encoder_ffn": 1536,
                      "llm_ffn": 2048, "llm_blocks": 8, "text_encoder_blocks": 2},
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_train(model, device, batch, text_len, speech_len, steps, dtype):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    text = torch.randint(1, 50000, (batch, text_len), device=device)
    speech = torch.randint(0, model.speech_token_size, (batch, speech_len), device=device)
    dur = torch.randint(1, 9, (batch, speech_len), device=device)
    tl = torch.full((batch,), text_len, device=device)
    sl = torch.full((batch,), speech_len, device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(text, tl, speech, sl, dur, framerate=0.91)
        opt.zero_grad(set_to_none=True)
        out.total_loss.backward()
        opt.step()

    step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t) / steps
    return {"step_s": round(dt, 4), "speech_tokens_per_s": round(batch * speech_len / dt, 1),
            "lm_positions_per_s": round(batch * (3 + text_len + speech_len) / dt, 1)}


def _counted(run, tokens) -> dict:
    """syncs and ops per generated token of one more (untimed, eager) run."""
    with SyncCounter() as c:
        run(compile_step=False)
    return {"syncs_per_token": round(c.syncs / max(tokens, 1), 4), "ops_per_token": round(c.ops / max(tokens, 1), 1),
            "syncs": c.syncs}


def _timed(run, device, dtype):
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        run()  # warm-up: identical (compiles and records graphs with --compile-step)
        sync(device)
        t = time.perf_counter()
        res = run()
        sync(device)
    return res, time.perf_counter() - t


def bench_sampling(model, device, text_len, prompt_len, gen_tokens, use_cache, dtype, check_every=16,
                   compile_step=False, count=True):
    model.eval()
    text = torch.randint(1, 50000, (1, text_len), device=device)
    prompt = torch.randint(0, model.speech_token_size, (1, prompt_len), device=device)
    pdur = torch.randint(1, 9, (1, prompt_len), device=device)

    def run(compile_step=compile_step):
        cfg = SamplingConfig(top_k=25, max_token_text_ratio=1e9, min_token_text_ratio=1e9, max_tokens=gen_tokens,
                             use_cache=use_cache, check_every=check_every, compile_step=compile_step and use_cache)
        g = torch.Generator(device=device).manual_seed(0)
        return generate(model, text, 0.91, None, prompt, pdur, cfg, generator=g)

    res, dt = _timed(run, device, dtype)
    n = res.tokens.size(1)
    out = {"tokens": n, "seconds": round(dt, 3), "tokens_per_s": round(n / dt, 1), "kv_cache": use_cache}
    return {**out, **(_counted(run, n) if count else {})}


def bench_sampling_batch(model, device, batch, text_len, prompt_len, gen_tokens, dtype, check_every=16,
                         compile_step=False):
    model.eval()
    texts = [torch.randint(1, 50000, (1, text_len), device=device) for _ in range(batch)]
    plens = [max(1, prompt_len - 2 * (i % 4)) for i in range(batch)]  # different prompt lengths: padded batch
    prompts = [torch.randint(0, model.speech_token_size, (1, n), device=device) for n in plens]
    pdurs = [torch.randint(1, 9, (1, n), device=device) for n in plens]

    def run(compile_step=compile_step):
        cfg = SamplingConfig(top_k=25, max_token_text_ratio=1e9, min_token_text_ratio=1e9, max_tokens=gen_tokens,
                             check_every=check_every, compile_step=compile_step)
        return generate_batch(model, texts, 0.91, None, prompts, pdurs, cfg,
                              generator=torch.Generator(device=device).manual_seed(0))

    res, dt = _timed(run, device, dtype)
    n = sum(r.tokens.size(1) for r in res)
    return {"batch": batch, "tokens": n, "seconds": round(dt, 3), "tokens_per_s": round(n / dt, 1),
            "steps_per_s": round(gen_tokens / dt, 1), **_counted(run, n)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-len", type=int, default=60)
    p.add_argument("--speech-len", type=int, default=100, help="speech tokens per item (8.3 Hz: 100 = 12 s)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=25)
    p.add_argument("--gen-tokens", type=int, default=100)
    p.add_argument("--no-cache", action="store_true", help="also time full recomputation")
    p.add_argument("--sample-batches", default="1,8",
                   help="comma-separated batch sizes for generate_batch ('' to skip)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile-step", action="store_true",
                   help="torch.compile the per-token step (CUDA: mode=reduce-overhead, CUDA graphs)")
    p.add_argument("--check-every", type=int, default=16, help="host checks for EOS every this many steps")
    p.add_argument("--skip-train", action="store_true", help="sampling only (e.g. the released size on a small CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = ARTTSModel(**PRESETS[args.config]()).to(device)
    report = {"config": args.config, "device": str(device), "precision": args.precision,
              "threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in model.parameters()),
              "compile_step": args.compile_step, "check_every": args.check_every,
              "sampling": bench_sampling(model, device, args.text_len, args.prompt_len, args.gen_tokens, True, dtype,
                                         args.check_every, args.compile_step)}
    report["sampling_batched"] = [
        bench_sampling_batch(model, device, int(b), args.text_len, args.prompt_len, args.gen_tokens, dtype,
                             args.check_every, args.compile_step)
        for b in args.sample_batches.split(",") if b.strip()]
    if not args.skip_train:
        report["train"] = bench_train(model, device, args.batch, args.text_len, args.speech_len, args.steps, dtype)
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    if args.no_cache:
        report["sampling_no_cache"] = bench_sampling(model, device, args.text_len, args.prompt_len,
                                                     args.gen_tokens, False, dtype, count=False)
    print(json.dumps(report, indent=2))
    print(summary(report))
    return report


def summary(report) -> str:
    """One line: the figures a comparison needs."""
    s = report["sampling"]
    parts = [f"config={report['config']}", f"device={report['device']}", f"precision={report['precision']}",
             f"threads={report['threads']}", f"compile_step={report['compile_step']}",
             f"check_every={report['check_every']}", f"single_tok_s={s['tokens_per_s']}",
             f"single_syncs_per_tok={s['syncs_per_token']}", f"single_ops_per_tok={s['ops_per_token']}"]
    for b in report["sampling_batched"]:
        n = b["batch"]
        parts += [f"batch{n}_tok_s={b['tokens_per_s']}", f"batch{n}_syncs_per_tok={b['syncs_per_token']}"]
    if "train" in report:
        parts.append(f"train_tok_s={report['train']['speech_tokens_per_s']}")
    return "SUMMARY " + " ".join(parts)


if __name__ == "__main__":
    main()
