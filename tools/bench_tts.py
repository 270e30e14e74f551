#!/usr/bin/env python
"""NAR (Voicebox flow-matching sampling) and vocoder (Vocos) real-time factors, random weights; optionally a batch
through the whole pipeline and the official NAR sampler on the same weights.

    python tools/bench_tts.py                       # released sizes (NAR 16 x 1024, Vocos 30 x 1024), CPU fp32
    python tools/bench_tts.py --preset tiny --seconds 5
    python tools/bench_tts.py --device cuda --precision bf16 --batch 8
    python tools/bench_tts.py --preset tiny --official DIR   # + the official sampler, same weights and noise

RTF = compute seconds / seconds of generated speech (< 1 is faster than real time). The NAR generates
`--seconds` of speech after a `--prompt-seconds` prompt with `--steps` Euler steps, classifier-free guidance
on (two passes per step, batched), i.e. the settings of the released sampler. Each time is the best of
--repeats after a warm-up run (which also compiles with --compile and autotunes with cudnn.benchmark).

`--batch N` (N > 1) also times `TTSPipeline.synthesize_batch` on N requests (the AR decodes them together, the
NAR samples their mels together with --nar-batch, the pipeline's default except on the CPU, else one at a time;
the vocoder runs per utterance) with random models of the preset's sizes (AR:
the released / tiny configuration of tools/bench_ar_tts.py; the prompt is tokenised by the tiny random codec, once:
the prompt file is cached after the warm-up). So that every utterance has the same length as the batch-1 run,
the AR cannot stop (EOS masked, `--seconds` x 6.25 tokens) and its duration head always picks 2 frames per token
(bias), i.e. 6.25 Hz at τ = 0.86; the text front end runs without G2P (no espeak-ng needed). Its RTF includes the
AR; its NAR RTF is comparable with the batch-1 NAR RTF (same frames per utterance).

`--official DIR` (a pip --target folder, set up as in tools/bench_ar_tts.py) builds the official VoiceboxWrapper
(flexicodec/nar_tts/modeling_voicebox.py, by tools/record_parity_vectors.py build_official_voicebox) at the
preset's sizes holding the benchmarked model's random weights, builds ours back from the official state dict
through the released-checkpoint import path (tools/import_nartts.py: `import_released_nartts`), and times the
sampling step only (`reverse_diffusion` vs `VoiceboxNAR.synthesize`, ours compiled with --compile) on the same
condition, prompt mel, initial noise (the official draw), Euler steps and CFG (rescale 0.75), each the best of
--repeats (alternating official / ours) after a warm-up. The mels must agree within 256 EPS x max|official mel|
(tests/tolerances.py NETWORK_REL; checked in float32 only).

The last line is one line of figures (RTFs) and settings:

    bench_tts: RTF R (NAR + vocoder) | NAR N | vocoder V | batch 1 | official NAR O (ours, same weights W) | ratio O/W x
        | mel within tolerance: True (max |Δ| d <= b) | preset=... device=... precision=... cudnn.benchmark=...
        compile=... batch=... seconds=... steps=... cfg=...

with `batch B: RTF P (TTSPipeline.synthesize_batch: AR a, NAR n, vocoder v), NAR speed-up over batch 1 S x` for
--batch B > 1, and `official NAR not run (--official DIR; set-up: ...)` without --official.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

PRESETS = {
    "released": ({}, {}),
    "tiny": ({"hidden_size": 64, "num_layers": 2, "num_heads": 4, "repa_layer_idx": 1},
             {"dim": 64, "intermediate_dim": 192, "num_layers": 2}),
}
EPS = float(torch.finfo(torch.float32).eps)
NETWORK_REL = 256 * EPS  # tests/tolerances.py: outputs of small float32 networks, relative to max |reference|
PIPELINE_THRESHOLD, PIPELINE_DURATION = 0.86, 2  # 6.25 Hz: every AR token lasts 2 frames of 12.5 Hz


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: torch.device, warmup: bool = True):
    """(best seconds of `repeats` runs after a warm-up run, the last run's result)."""
    if warmup:
        fn()
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_pipeline(args, nar, vocoder, device, autocast) -> dict:
    """`TTSPipeline.synthesize_batch` on `args.batch` requests (see the module docstring)."""
    import numpy as np
    import soundfile as sf
    from hydra.utils import instantiate

    from bench_ar_tts import PRESETS as AR_PRESETS

    from flexitrain.models.tts.ar_tts import ARTTSModel
    from flexitrain.models.tts.sampling import SamplingConfig
    from flexitrain.tasks.teacher import build_teacher
    from flexitrain.tts import TTSPipeline, TTSRequest
    from flexitrain.tts.pipeline import NARConfig
    from flexitrain.utils.config import compose

    torch.manual_seed(0)
    codec = instantiate(compose(["model=codec_tiny"], return_hydra_config=False).model).eval()
    teacher = build_teacher({"random_init": True, "num_blocks": 1})
    ar = ARTTSModel(**AR_PRESETS[args.preset]()).eval()  # tools/bench_ar_tts.py's sizes
    with torch.no_grad():  # every duration = PIPELINE_DURATION frames: the same length in every run
        ar.duration_decoder.bias.fill_(-1e4)
        ar.duration_decoder.bias[PIPELINE_DURATION] = 0.0
    n_tokens = max(1, round(args.seconds * 12.5 / PIPELINE_DURATION))
    sampling = SamplingConfig(max_token_text_ratio=1e9, min_token_text_ratio=1e9, max_tokens=n_tokens)
    tts = TTSPipeline(ar, nar, vocoder, codec, teacher, sampling=sampling,
                      nar_config=NARConfig(n_timesteps=args.steps, cfg=args.cfg, compile=args.compile,
                                           batch=args.nar_batch),
                      device=device, g2p=False)
    with tempfile.TemporaryDirectory() as tmp:
        t = np.arange(round(args.prompt_seconds * 16000)) / 16000
        wav = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
        prompt = Path(tmp) / "prompt.wav"
        sf.write(str(prompt), wav.astype(np.float32), 16000)
        requests = [TTSRequest("This sentence is read by a random model to time the pipeline.", prompt,
                               "A short prompt.", threshold=PIPELINE_THRESHOLD, seed=i) for i in range(args.batch)]

        def run():
            with autocast:
                return tts.synthesize_batch(requests, max_batch=args.batch)

        wall, results = timed(run, args.repeats, device)
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise RuntimeError(f"synthesize_batch failed: {failed[0]!r}")
    audio_s = sum(r.seconds for r in results)
    stage = {k: sum(r.timings.get(k, 0.0) for r in results) for k in ("prompt", "ar", "nar", "vocoder")}
    return {"batch": args.batch, "nar_batched": nar_batched(args), "tokens_per_utterance": n_tokens,
            "audio_seconds": audio_s, "seconds": wall,
            "rtf": wall / audio_s, **{f"{k}_seconds": v for k, v in stage.items()},
            **{f"{k}_rtf": v / audio_s for k, v in stage.items()}}


def official_voicebox_config(config) -> tuple[dict, dict]:
    """VoiceboxConfig -> the official (voicebox_config, VoiceboxWrapper keyword arguments)."""
    if config.rope_theta != 10000.0:
        raise ValueError("the official DiffLlama uses rope_theta 10000")
    vb = {"mel_dim": config.mel_dim, "hidden_size": config.hidden_size, "num_layers": config.num_layers,
          "num_heads": config.num_heads, "cfg_scale": 0.2, "use_cond_code": True,
          "cond_codebook_size": config.cond_codebook_size, "cond_scale_factor": config.cond_scale_factor,
          "cond_dim": config.hidden_size, "sigma": 1e-5, "time_scheduler": "cos",
          "repa_layer_idx": config.repa_layer_idx}
    wrapper = {"ssl_feature_dim": config.ssl_feature_dim, "repa_projection_dim": config.repa_projection_dim,
               "use_repa_loss": config.use_repa}
    return vb, wrapper


def official_and_ours_nar(nar):
    """The official VoiceboxWrapper holding the weights of `nar` (record_parity_vectors.build_official_voicebox,
    strict load: the key sets are the same), and a VoiceboxNAR built from the official state dict by the released-
    checkpoint import path (tools/import_nartts.py: `import_released_nartts`, sizes from the shapes, strict).

    The weights are our random initialisation (normal std 0.02, adaptive-norm scales 1), not the record script's
    extra 0.05 noise: at the released width that noise makes the velocity ~100 and the network chaotic, so float32
    rounding is amplified without bound through the guided Euler steps and a comparison would say nothing."""
    import record_parity_vectors as rpv

    from flexitrain.models.tts.voicebox_import import import_released_nartts

    config = nar.config
    vb_config, wrapper_kwargs = official_voicebox_config(config)
    state = {k: v.detach().cpu() for k, v in nar.state_dict().items()}
    wrapper = rpv.build_official_voicebox(vb_config, wrapper_kwargs, state=state, seed=0)
    ours = import_released_nartts(wrapper.state_dict(), config.num_heads, config.repa_layer_idx)
    return wrapper, ours


def bench_official_nar(args, nar, codes, prompt_codes, prompt_mel, device, autocast) -> dict:
    """The sampling step, official vs ours, on the same weights, condition, prompt, noise, steps and CFG."""
    import record_parity_vectors as rpv

    wrapper, ours = official_and_ours_nar(nar)
    ours = ours.to(device)
    vb = wrapper.voicebox_model.to(device).eval()
    durations = torch.ones_like(codes)
    cond_codes = torch.cat([prompt_codes, torch.repeat_interleave(codes, durations)])[None]
    sampler = {"n_timesteps": args.steps, "cfg": args.cfg, "rescale_cfg": 0.75}

    def run_official():
        torch.manual_seed(0)  # the same initial noise every run
        with torch.inference_mode(), autocast:
            return vb.reverse_diffusion(rpv.vb_cond(vb, cond_codes), prompt=prompt_mel[None], **sampler)

    store = []
    with rpv.randn_spy(store):  # the warm-up run; its first draw is the initial noise
        first = run_official()
    noise = store[0]

    estimator = torch.compile(ours.voicebox_model, dynamic=True) if args.compile else None

    def run_ours():
        with torch.inference_mode(), autocast:
            return ours.synthesize(codes, durations, prompt_codes, prompt_mel, noise=noise, estimator=estimator,
                                   **sampler)

    run_ours()  # warm-up (compiles with --compile)
    from bench_ar_tts import timed_pair

    t_official, theirs, t_ours, mine = timed_pair(run_official, run_ours, args.repeats, device)
    same_noise = torch.equal(first, theirs)  # the seeded draw repeats: every official run had the compared noise
    theirs, mine = theirs[0].float(), mine.float()
    diff = float((mine - theirs).abs().max()) if mine.shape == theirs.shape else float("inf")
    bound = NETWORK_REL * float(theirs.abs().max())
    return {"official_seconds": t_official, "ours_seconds": t_ours, "official_rtf": t_official / args.seconds,
            "ours_rtf": t_ours / args.seconds, "ratio": t_official / t_ours, "max_abs_diff": diff, "bound": bound,
            "within_tolerance": (diff <= bound and same_noise) if args.precision == "fp32" else None,
            "official_noise_repeats": same_noise,
            "steps": args.steps, "cfg": args.cfg, "rescale_cfg": 0.75}


def settings(args, where: str) -> str:
    cuda = args.device.startswith("cuda")
    cudnn = bool(torch.backends.cudnn.benchmark) if cuda else "n/a"
    tf32 = torch.backends.cuda.matmul.allow_tf32 if cuda else "n/a"
    return (f"preset={args.preset} device={args.device} ({where}) precision={args.precision} "
            f"threads={torch.get_num_threads()} cudnn.benchmark={cudnn} tf32={tf32} "
            f"compile={'nar' if args.compile else 'off'} batch={args.batch} seconds={args.seconds:g} "
            f"prompt_seconds={args.prompt_seconds:g} steps={args.steps} cfg={args.cfg:g} repeats={args.repeats}"
            + (f" pipeline_ar={args.preset} tau={PIPELINE_THRESHOLD} frames_per_token={PIPELINE_DURATION} g2p=off "
               f"nar_batch={'on' if nar_batched(args) else 'off'}" if args.batch > 1 else ""))


def nar_batched(args) -> bool:
    """Whether synthesize_batch samples a chunk's mels together (NARConfig.batch; None: not on the CPU)."""
    return (torch.device(args.device).type != "cpu") if args.nar_batch is None else args.nar_batch


def final_line(out: dict) -> str:
    parts = [f"RTF {out['rtf']:.4f} (NAR + vocoder)", f"NAR {out['nar_rtf']:.4f}", f"vocoder {out['vocoder_rtf']:.4f}"]
    p = out.get("pipeline")
    if p is None:
        parts.append("batch 1")
    else:
        parts.append(f"batch {p['batch']}: RTF {p['rtf']:.4f} (TTSPipeline.synthesize_batch, NAR "
                     f"{'batched' if p['nar_batched'] else 'per utterance'}: AR {p['ar_rtf']:.4f}, "
                     f"NAR {p['nar_rtf']:.4f}, vocoder {p['vocoder_rtf']:.4f}), NAR speed-up over batch 1 "
                     f"{out['nar_rtf'] / p['nar_rtf']:.2f}x")
    o = out.get("official")
    if o is None:
        from bench_ar_tts import OFFICIAL_NOT_RUN

        parts.append(OFFICIAL_NOT_RUN.replace("official", "official NAR", 1))
    else:
        check = ("n/a (bf16)" if o["within_tolerance"] is None else
                 f"{o['within_tolerance']} (max |Δ| {o['max_abs_diff']:.2e} <= {o['bound']:.2e})")
        parts += [f"official NAR {o['official_rtf']:.4f} (ours, same weights {o['ours_rtf']:.4f})",
                  f"ratio {o['ratio']:.2f}x", f"mel within tolerance: {check}"]
    return "bench_tts: " + " | ".join(parts + [out["settings"]])


def main(argv=None) -> dict:
    from flexitrain.models.tts.voicebox import VoiceboxNAR
    from flexitrain.models.vocos import Vocos

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="released")
    ap.add_argument("--seconds", type=float, default=4.0, help="generated speech per utterance")
    ap.add_argument("--prompt-seconds", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=2, help="best of N timed runs (after one warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1,
                    help="N > 1: also time TTSPipeline.synthesize_batch on N utterances (AR + NAR + vocoder)")
    ap.add_argument("--nar-batch", action=argparse.BooleanOptionalAction, default=None,
                    help="--batch N: NARConfig.batch, sample the N mels together (default: the pipeline's, i.e. "
                         "together except on the CPU)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the NAR velocity model (dynamic shapes, as NARConfig.compile; compiles on "
                         "the warm-up)")
    ap.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.backends.cudnn.benchmark (default: on with CUDA; the shapes repeat here)")
    ap.add_argument("--official", type=Path, default=None,
                    help="pip --target folder of flexicodec==0.1.2 + dependencies (tools/bench_ar_tts.py --help): "
                         "also time the official NAR sampler on the same weights and noise")
    ap.add_argument("--torchaudio-wheel", type=Path, default=None,
                    help="torchaudio-2.11.0 wheel (default: the one in --official DIR)")
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error("--batch must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True if args.cudnn_benchmark is None else args.cudnn_benchmark
    if args.official is not None:  # fail early when the folder is not usable
        from bench_ar_tts import check_official

        check_official(args.official, args.torchaudio_wheel)
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
    estimator = torch.compile(nar.voicebox_model, dynamic=True) if args.compile else None

    def run_nar():
        with torch.inference_mode(), autocast:
            nar.synthesize(codes, torch.ones_like(codes), prompt_codes, prompt_mel, n_timesteps=args.steps,
                           cfg=args.cfg, seed=0, estimator=estimator)

    def run_vocoder():
        with torch.inference_mode(), autocast:
            vocoder(mel)

    t_nar, _ = timed(run_nar, args.repeats, device)
    t_voc, _ = timed(run_vocoder, args.repeats, device)
    n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads")
    out = {"nar_seconds": t_nar, "vocoder_seconds": t_voc, "nar_rtf": t_nar / args.seconds,
           "vocoder_rtf": t_voc / args.seconds, "rtf": (t_nar + t_voc) / args.seconds,
           "settings": settings(args, where)}
    print(f"[bench_tts] {args.preset} ({n_params(nar):.1f} M NAR, {n_params(vocoder):.1f} M vocoder), {where}, "
          f"{args.precision}; {args.seconds:g} s generated after a {args.prompt_seconds:g} s prompt")
    print(f"  NAR     {args.steps} Euler steps, cfg {args.cfg:g}: {t_nar:.3f} s  -> RTF {out['nar_rtf']:.3f}")
    print(f"  vocoder {n_gen * 4} mel frames:          {t_voc:.3f} s  -> RTF {out['vocoder_rtf']:.4f}")
    if args.batch > 1:
        p = out["pipeline"] = bench_pipeline(args, nar, vocoder, device, autocast)
        print(f"  batch {args.batch} (TTSPipeline.synthesize_batch, {p['audio_seconds']:.2f} s of speech): "
              f"{p['seconds']:.3f} s -> RTF {p['rtf']:.3f} (AR {p['ar_rtf']:.3f}, NAR {p['nar_rtf']:.3f}, "
              f"vocoder {p['vocoder_rtf']:.4f}, prompt {p['prompt_rtf']:.4f})")
    if args.official is not None:
        from bench_ar_tts import prepare_official

        prepare_official(args.official, args.torchaudio_wheel)  # after our runs: it puts DIR first on sys.path
        o = out["official"] = bench_official_nar(args, nar, codes, prompt_codes, prompt_mel, device, autocast)
        print(f"  official NAR sampler: {o['official_seconds']:.3f} s (RTF {o['official_rtf']:.3f}); ours on the "
              f"same weights and noise {o['ours_seconds']:.3f} s (RTF {o['ours_rtf']:.3f}): {o['ratio']:.2f}x; "
              f"max |Δmel| {o['max_abs_diff']:.2e} (bound {o['bound']:.2e})")
    print(final_line(out))
    return out


if __name__ == "__main__":
    main()
