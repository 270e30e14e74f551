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
same). A `SUMMARY` line gives the figures as key=value:

    python tools/bench_ar_tts.py --config small --skip-train --compile-step --check-every 16
    SUMMARY config=small device=cpu ... single_tok_s=... batch8_tok_s=... syncs_per_tok=...

and the very last line states the figures, the comparison with the official code and every setting:

    bench_ar_tts: ours X tok/s (batch 1), generate_batch Y1 tok/s (batch 1), Y8 tok/s (batch 8) | official Z tok/s
        (greedy; ours W tok/s) | ratio W/Z x | greedy identical: True | config=... device=... precision=...
        cudnn.benchmark=... compile_step=... sample_batches=1,8 train_batch=... ...

(one line; "official not run (--official DIR; set-up: ...)" without --official).

Official comparison (`--official DIR`; not run by default): the official AR (flexicodec==0.1.2,
`flexicodec/ar_tts/modeling_artts.py` TransformerLMWrapper) is built in this process at the same configuration with
random weights (`tools/record_parity_vectors.py` build_official_ar: its seeded initialisation + noise), and ours
gets the same weights through the released-checkpoint import path (`tools/import_artts.py`: `transformer_lm.*` ->
ARTTSModel keys, strictly). Both decode one utterance greedily (top-k 1, duration top-k 1) from the same target
text (gen-tokens/2 ids), prompt text (10 ids) and prompt (prompt-len tokens + durations) at τ = 0.91, capped at 2
tokens per target-text id (the official call of record_parity_vectors.ar_greedy), each timed as the best of
--repeats (alternating official / ours) after a warm-up, under the same precision. Greedy tokens and durations must
be identical in float32 (parity; under bf16 autocast near-ties may flip); ar_greedy's per-step logits give the
smallest top-1/top-2 margins (`min_token_logit_margin` in the report). The duration head's class 0 (the start id,
never a training target, which our decoder masks and the official one does not) gets bias -1e4 in these random
weights, as a trained head ranks it last. DIR is a `pip --target` folder (DIR may also hold the torchaudio wheel,
else give --torchaudio-wheel; only its pure-Python kaldi/functional files are used):

    .venv/bin/python -m pip install --no-deps --target DIR flexicodec==0.1.2 transformers==4.41.2 \\
        'huggingface_hub>=0.23,<1.0' tokenizers==0.19.1 funasr==1.4.16 kaldiio six easydict phonemizer dlinfo
    .venv/bin/python -m pip download --no-deps -d DIR torchaudio==2.11.0
    .venv/bin/python tools/bench_ar_tts.py --config small --skip-train --official DIR
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexitrain.models.tts.ar_tts import ARTTSModel, released_config, tiny_config  # noqa: E402
from flexitrain.models.tts.sampling import SamplingConfig, generate, generate_batch  # noqa: E402
from flexitrain.utils.dispatch_count import SyncCounter  # noqa: E402

TOOLS = Path(__file__).resolve().parent
OFFICIAL_PACKAGES = ("flexicodec==0.1.2 transformers==4.41.2 'huggingface_hub>=0.23,<1.0' tokenizers==0.19.1 "
                     "funasr==1.4.16 kaldiio six easydict phonemizer dlinfo")
OFFICIAL_SETUP = (f"pip install --no-deps --target DIR {OFFICIAL_PACKAGES}; "
                  "pip download --no-deps -d DIR torchaudio==2.11.0")
OFFICIAL_NOT_RUN = f"official not run (--official DIR; set-up: {OFFICIAL_SETUP})"

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


# ---- the official code ----------------------------------------------------------------------------------------
_OFFICIAL_READY: dict = {}


def check_official(official: Path, torchaudio_wheel: Path | None = None) -> tuple[Path, Path]:
    """(folder, torchaudio wheel) when `official` looks like the pip --target folder of OFFICIAL_SETUP (nothing is
    imported); SystemExit saying what is missing otherwise."""
    official = Path(official).resolve()
    if not (official / "flexicodec").is_dir() or not (official / "transformers").is_dir():
        raise SystemExit(f"--official {official}: no flexicodec/transformers there; set-up: {OFFICIAL_SETUP}")
    wheel = torchaudio_wheel or next(iter(sorted(official.glob("torchaudio-*.whl"))), None)
    if wheel is None or not Path(wheel).is_file():
        raise SystemExit(f"no torchaudio wheel in {official} (pip download --no-deps -d {official} "
                         "torchaudio==2.11.0) and no --torchaudio-wheel given")
    return official, Path(wheel)


def prepare_official(official: Path, torchaudio_wheel: Path | None = None) -> dict:
    """Make flexicodec==0.1.2 importable in this process, as tools/record_parity_vectors.py does (its
    `setup_official`: the wheel's pure-Python torchaudio files, stubs for audiotools / cached_path, nothing
    downloaded). It puts the folder first on sys.path, so call it after our own imports and runs. Once per
    process."""
    official, wheel = check_official(official, torchaudio_wheel)
    if _OFFICIAL_READY:
        if _OFFICIAL_READY["dir"] != official:
            raise SystemExit(f"the official code was already loaded from {_OFFICIAL_READY['dir']}")
        return _OFFICIAL_READY
    sys.path.insert(0, str(TOOLS))
    import record_parity_vectors as rpv

    work = Path(tempfile.mkdtemp(prefix="bench_official_"))  # the torchaudio subset, imported from here
    atexit.register(shutil.rmtree, work, True)
    info = rpv.setup_official(official, wheel, work, None)
    _OFFICIAL_READY.update(dir=official, version=info["version"], torchaudio=info["torchaudio_subset"]["version"],
                           transformers=info["versions"].get("transformers"))
    return _OFFICIAL_READY


def official_ar_config(c: dict) -> dict:
    """ARTTSModel arguments -> official TransformerLMWrapper arguments (the inverse of port_ar_config in
    tests/test_parity_bundled.py)."""
    return dict(text_encoder_input_size=c["text_encoder_dim"], text_encoder_output_size=c["text_encoder_dim"],
                text_encoder_attention_heads=c["text_encoder_heads"], text_encoder_linear_units=c["text_encoder_ffn"],
                text_encoder_num_blocks=c["text_encoder_blocks"], llm_input_size=c["llm_dim"],
                llm_output_size=c["llm_dim"], llm_attention_heads=c["llm_heads"], llm_linear_units=c["llm_ffn"],
                llm_num_blocks=c["llm_blocks"], text_token_size=c["text_token_size"],
                speech_token_size=c["speech_token_size"], spk_embed_dim=c["spk_embed_dim"],
                duration_classes=c["duration_classes"], use_duration_conditioning=True, flex_framerate=True,
                flex_framerate_options=[float(x) for x in c["framerate_options"]])


def official_and_ours(config: dict, seed: int = 0):
    """The official AR with random weights (record_parity_vectors.build_official_ar) and an ARTTSModel holding the
    same weights, moved by the released-checkpoint import path (tools/import_artts.py: `transformer_lm.*` ->
    ARTTSModel keys, every key and shape checked)."""
    import record_parity_vectors as rpv

    from flexitrain.models.tts.ar_checkpoint import check_compatible, to_model_keys

    wrapper = rpv.build_official_ar(official_ar_config(config), seed=seed)
    with torch.no_grad():  # class 0 = the start id: never a target, ranked last by a trained head (see the docstring)
        wrapper.transformer_lm.duration_decoder.bias[0] = -1e4
    state, _ = to_model_keys(wrapper.state_dict())
    ours = ARTTSModel(**config).eval()
    check_compatible(ours, state)
    ours.load_state_dict(state, strict=True)
    return wrapper, ours


def timed_pair(fn_a, fn_b, repeats: int, device) -> tuple:
    """Best times of two functions over `repeats` rounds of one timed run of each, alternating (a drifting load on a
    shared machine then hits both alike): (best a, last result of a, best b, last result of b). No warm-up: do it
    before."""
    best, outs = [float("inf"), float("inf")], [None, None]
    for _ in range(max(1, repeats)):
        for i, fn in enumerate((fn_a, fn_b)):
            sync(device)
            t0 = time.perf_counter()
            outs[i] = fn()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], outs[0], best[1], outs[1]


def bench_official(config: dict, device, gen_tokens: int, prompt_len: int, dtype, repeats: int = 3,
                   check_every: int = 16, compile_step: bool = False) -> dict:
    """Greedy single-utterance decoding, official vs ours, same weights and inputs (see the module docstring)."""
    import record_parity_vectors as rpv

    wrapper, ours = official_and_ours(config)
    wrapper, ours = wrapper.to(device), ours.to(device)
    g = torch.Generator().manual_seed(1)
    n_text = max(1, -(-gen_tokens // 2))  # ar_greedy's call caps at max_token_text_ratio 2.0 x target text ids
    n_vocab = min(50000, config["text_token_size"])
    case = {"text": torch.randint(1, n_vocab, (1, n_text), generator=g), "text_len": torch.tensor([n_text]),
            "prompt_text": torch.randint(1, n_vocab, (1, 10), generator=g), "prompt_text_len": torch.tensor([10]),
            "prompt_speech_token": torch.randint(0, config["speech_token_size"], (1, prompt_len), generator=g),
            "prompt_speech_token_len": torch.tensor([prompt_len]),
            "prompt_token_lengths": torch.randint(1, 9, (1, prompt_len), generator=g)}
    case = {k: v.to(device) for k, v in case.items()}
    case["framerate"] = 0.91

    def run_official():  # the call of record_parity_vectors.ar_greedy, without its hooks
        with contextlib.redirect_stdout(io.StringIO()):  # the official decoder prints
            return wrapper.inference(
                case["text"].clone(), case["text_len"].clone(), case["prompt_text"].clone(),
                case["prompt_text_len"].clone(), case["prompt_speech_token"].clone(),
                case["prompt_speech_token_len"].clone(), embedding=None,
                prompt_token_lengths=case["prompt_token_lengths"].clone(), beam_size=1, top_k=1, temperature=1.0,
                max_token_text_ratio=2.0, min_token_text_ratio=0.0, predict_duration=True, duration_temperature=1.0,
                duration_top_k=1, inference_framerate=case["framerate"])

    cfg = SamplingConfig(top_k=1, duration_top_k=1, max_token_text_ratio=2.0, check_every=check_every,
                         compile_step=compile_step)

    def run_ours():
        return generate(ours, case["text"], case["framerate"], case["prompt_text"], case["prompt_speech_token"],
                        case["prompt_token_lengths"], cfg)

    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):  # both under the same autocast
        run_official(), run_ours()  # warm-up
        t_official, theirs, t_ours, mine = timed_pair(run_official, run_ours, repeats, device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        traced = rpv.ar_greedy(wrapper, case)  # untimed, with per-step logits
    o_tokens, o_dur = theirs["speech_tokens"].cpu(), theirs["duration_classes"].cpu()
    n_dur = o_dur.size(1)  # at the length cap the official loop stops one duration short
    same_call = torch.equal(o_tokens, traced["speech_tokens"].cpu()) and torch.equal(
        o_dur, traced["duration_classes"].cpu())
    identical = same_call and torch.equal(mine.tokens.cpu(), o_tokens) and torch.equal(
        mine.durations[:, :n_dur].cpu(), o_dur)
    n_official, n_ours = o_tokens.size(1), mine.tokens.size(1)
    return {"decoding": "greedy (top-k 1, duration top-k 1), one utterance, tau 0.91",
            "text_len": n_text, "prompt_text_len": 10, "prompt_len": prompt_len, "max_tokens": 2 * n_text,
            "repeats": repeats, "official_tokens": n_official, "official_seconds": round(t_official, 4),
            "official_tokens_per_s": round(n_official / t_official, 1), "ours_tokens": n_ours,
            "ours_seconds": round(t_ours, 4), "ours_tokens_per_s": round(n_ours / t_ours, 1),
            "ratio": round(t_official / t_ours * n_ours / max(n_official, 1), 3) if n_official else float("nan"),
            "greedy_identical": bool(identical), "official_stopped_by_eos": n_dur == n_official,
            "min_token_logit_margin": rpv.top2_gap(traced["step_logits"].float()),
            "min_duration_logit_margin": rpv.top2_gap(traced["step_duration_logits"].float()),
            "official_package": dict(_OFFICIAL_READY, dir=str(_OFFICIAL_READY.get("dir")))}


def settings(report) -> str:
    """Every setting the figures depend on, as key=value."""
    return (f"config={report['config']} device={report['device']} precision={report['precision']} "
            f"threads={report['threads']} cudnn.benchmark={report['cudnn_benchmark']} "
            f"compile_step={report['compile_step']} check_every={report['check_every']} "
            f"sample_batches={','.join(str(b) for b in report['sample_batches']) or 'none'} "
            f"train_batch={report['train_batch'] if report['train_batch'] else 'skipped'} "
            f"text_len={report['text_len']} prompt_len={report['prompt_len']} gen_tokens={report['gen_tokens']}")


def final_line(report) -> str:
    """The one-line summary: our tokens/s (batch 1 and the batched decodes), the official comparison, settings."""
    ours = f"{report['sampling']['tokens_per_s']} tok/s (batch 1)"
    if report["sampling_batched"]:
        ours += ", generate_batch " + ", ".join(f"{b['tokens_per_s']} tok/s (batch {b['batch']})"
                                               for b in report["sampling_batched"])
    o = report.get("official")
    if o is None:
        official = OFFICIAL_NOT_RUN
    else:
        official = (f"official {o['official_tokens_per_s']} tok/s (greedy; ours {o['ours_tokens_per_s']} tok/s) | "
                    f"ratio {o['ratio']:.2f}x | greedy identical: {o['greedy_identical']}")
    return f"bench_ar_tts: ours {ours} | {official} | {settings(report)}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=4, help="training batch")
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
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.backends.cudnn.benchmark (default: on with CUDA, as bench_codec; the AR has no "
                        "convolutions, so it is stated rather than expected to matter)")
    p.add_argument("--official", type=Path, default=None,
                   help="pip --target folder holding flexicodec==0.1.2 and its pure-Python dependencies: also time "
                        "the official AR on the same weights and inputs (see the docstring for the set-up)")
    p.add_argument("--torchaudio-wheel", type=Path, default=None,
                   help="torchaudio-2.11.0 wheel (default: the one in --official DIR)")
    p.add_argument("--repeats", type=int, default=3, help="official comparison: best of N timed runs per side")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True if args.cudnn_benchmark is None else args.cudnn_benchmark
    if args.official is not None:  # fail early (before the long runs) when the folder is not usable
        check_official(args.official, args.torchaudio_wheel)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = ARTTSModel(**PRESETS[args.config]()).to(device)
    batches = [int(b) for b in args.sample_batches.split(",") if b.strip()]
    report = {"config": args.config, "device": str(device), "precision": args.precision,
              "threads": torch.get_num_threads(),
              "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if device.type == "cuda" else "n/a",
              "parameters": sum(p.numel() for p in model.parameters()),
              "compile_step": args.compile_step, "check_every": args.check_every, "sample_batches": batches,
              "train_batch": None if args.skip_train else args.batch, "text_len": args.text_len,
              "prompt_len": args.prompt_len, "gen_tokens": args.gen_tokens,
              "sampling": bench_sampling(model, device, args.text_len, args.prompt_len, args.gen_tokens, True, dtype,
                                         args.check_every, args.compile_step)}
    report["sampling_batched"] = [
        bench_sampling_batch(model, device, b, args.text_len, args.prompt_len, args.gen_tokens, dtype,
                             args.check_every, args.compile_step)
        for b in batches]
    if not args.skip_train:
        report["train"] = bench_train(model, device, args.batch, args.text_len, args.speech_len, args.steps, dtype)
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    if args.no_cache:
        report["sampling_no_cache"] = bench_sampling(model, device, args.text_len, args.prompt_len,
                                                     args.gen_tokens, False, dtype, count=False)
    if args.official is not None:
        del model
        prepare_official(args.official, args.torchaudio_wheel)
        report["official"] = bench_official(PRESETS[args.config](), device, args.gen_tokens, args.prompt_len, dtype,
                                            args.repeats, args.check_every, args.compile_step)
    report["settings"] = settings(report)
    print(json.dumps(report, indent=2))
    print(summary(report))
    print(final_line(report))
    return report


def summary(report) -> str:
    """One line: the figures a comparison needs."""
    s = report["sampling"]
    parts = [f"config={report['config']}", f"device={report['device']}", f"precision={report['precision']}",
             f"threads={report['threads']}", f"cudnn_benchmark={report['cudnn_benchmark']}",
             f"compile_step={report['compile_step']}",
             f"check_every={report['check_every']}", f"single_tok_s={s['tokens_per_s']}",
             f"single_syncs_per_tok={s['syncs_per_token']}", f"single_ops_per_tok={s['ops_per_token']}"]
    for b in report["sampling_batched"]:
        n = b["batch"]
        parts += [f"batch{n}_tok_s={b['tokens_per_s']}", f"batch{n}_syncs_per_tok={b['syncs_per_token']}"]
    if "train" in report:
        parts += [f"train_batch={report['train_batch']}", f"train_tok_s={report['train']['speech_tokens_per_s']}"]
    if "official" in report:
        o = report["official"]
        parts += [f"official_greedy_tok_s={o['official_tokens_per_s']}", f"ours_greedy_tok_s={o['ours_tokens_per_s']}",
                  f"official_ratio={o['ratio']}", f"greedy_identical={o['greedy_identical']}"]
    return "SUMMARY " + " ".join(parts)


if __name__ == "__main__":
    main()
