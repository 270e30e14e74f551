"""`flexitrain-tts`: zero-shot FlexiCodec-TTS from local checkpoints (AR → NAR → Vocos, 24 kHz output).

One utterance:
    flexitrain-tts --ar AR --nar NAR --vocoder VOCOS --text "Hello." --prompt-wav ref.wav \\
        --prompt-text "Words of the prompt." --frame-rate 8.3 --out hello.wav
Batch (a JSON-lines file: {"text", "prompt_wav", "prompt_text", optional "id", "language", "frame_rate"}):
    flexitrain-tts --ar AR --nar NAR --vocoder VOCOS --batch items.jsonl --out-dir out/

AR / NAR: a training checkpoint (.ckpt of ARTTSTask / VoiceboxTask) or an imported/exported directory; VOCOS: a
VocosTask .ckpt, an exported directory or the released vocos_emilia.safetensors; --codec: the FlexiCodec both were
trained on (a CodecTask .ckpt, or an exported directory with --teacher-dir), default: the one the AR checkpoint
carries. Prints the frame rate and the real-time factor of every utterance and of the whole run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexitrain-tts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("models (local files; nothing is downloaded)")
    m.add_argument("--ar", required=True, help="AR text→token model")
    m.add_argument("--nar", required=True, help="Voicebox NAR token→mel model")
    m.add_argument("--vocoder", required=True, help="Vocos 24 kHz vocoder")
    m.add_argument("--codec", default=None, help="FlexiCodec for the prompt (default: the AR checkpoint's)")
    m.add_argument("--teacher-dir", default=None, help="SenseVoiceSmall directory (with an exported --codec)")
    m.add_argument("--device", default="cpu")
    i = p.add_argument_group("input")
    i.add_argument("--text", help="text to speak")
    i.add_argument("--prompt-wav", help="a few seconds of the target voice")
    i.add_argument("--prompt-text", default="", help="transcript of the prompt")
    i.add_argument("--batch", help="JSON-lines file of utterances (instead of --text/--prompt-*)")
    i.add_argument("--language", default="en")
    i.add_argument("--frame-rate", type=float, default=8.3, help="tokens/s: 12.5, 8.3 or 6.25 (see --frame-rates)")
    i.add_argument("--threshold", type=float, default=None, help="merging threshold (overrides --frame-rate)")
    i.add_argument("--frame-rates", default=None,
                   help='JSON map of frame rate (Hz) → threshold, default {"12.5": 1.0, "8.3": 0.91, "6.25": 0.86}')
    o = p.add_argument_group("output")
    o.add_argument("--out", default="tts.wav", help="output wav (single utterance)")
    o.add_argument("--out-dir", default="tts_out", help="output folder (batch): <id>.wav + results.jsonl")
    o.add_argument("--ar-batch", type=int, default=16, help="utterances the AR decodes together (batch mode)")
    s = p.add_argument_group("sampling")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--top-k", type=int, default=25)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--duration-top-k", type=int, default=1)
    s.add_argument("--duration-temperature", type=float, default=1.0)
    s.add_argument("--max-token-text-ratio", type=float, default=20.0, help="length cap: tokens per text id")
    s.add_argument("--min-token-text-ratio", type=float, default=0.0, help="no EOS before this many tokens per text id")
    s.add_argument("--min-prompt-pace", type=float, default=0.0,
                   help="> 0: no EOS before this fraction of the prompt's tokens-per-text-id pace (weak demo models)")
    s.add_argument("--steps", type=int, default=15, help="NAR Euler steps")
    s.add_argument("--cfg", type=float, default=2.0, help="NAR classifier-free guidance strength")
    s.add_argument("--rescale-cfg", type=float, default=0.75)
    return p


def read_batch(path: str | Path, args) -> list:
    from flexitrain.tts.pipeline import TTSRequest

    requests = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        missing = [k for k in ("text", "prompt_wav") if not row.get(k)]
        if missing:
            raise ValueError(f"{path}:{n}: missing {', '.join(missing)}")
        prompt = Path(row["prompt_wav"])
        if not prompt.is_absolute():
            prompt = Path(path).parent / prompt
        requests.append(TTSRequest(text=row["text"], prompt_wav=prompt, prompt_text=row.get("prompt_text", ""),
                                   language=row.get("language", args.language),
                                   frame_rate=row.get("frame_rate", args.frame_rate),
                                   # a row's own frame rate wins over the command line's --threshold
                                   threshold=row.get("threshold", None if "frame_rate" in row else args.threshold),
                                   seed=args.seed,
                                   id=str(row.get("id", f"utt{n:05d}"))))
    if not requests:
        raise ValueError(f"{path} has no utterances")
    return requests


def build_pipeline(args):
    from flexitrain.models.tts.sampling import SamplingConfig
    from flexitrain.tts.pipeline import NARConfig, TTSPipeline

    frame_rates = {float(k): float(v) for k, v in json.loads(args.frame_rates).items()} if args.frame_rates else None
    teacher = {"model_dir": args.teacher_dir} if args.teacher_dir else None
    sampling = SamplingConfig(top_k=args.top_k, temperature=args.temperature, duration_top_k=args.duration_top_k,
                              duration_temperature=args.duration_temperature,
                              max_token_text_ratio=args.max_token_text_ratio,
                              min_token_text_ratio=args.min_token_text_ratio)
    return TTSPipeline.from_checkpoints(args.ar, args.nar, args.vocoder, codec=args.codec, teacher=teacher,
                                        frame_rates=frame_rates, sampling=sampling,
                                        nar_config=NARConfig(args.steps, args.cfg, args.rescale_cfg), device=args.device,
                                        min_prompt_pace=args.min_prompt_pace)


def _line(name: str, r) -> str:
    return (f"{name}: {r.seconds:.2f} s, {r.tokens.numel()} tokens, frame rate {r.frame_rate:.2f} Hz "
            f"(τ={r.threshold:g}{'' if r.stopped_by_eos else ', length cap'}), RTF {r.rtf:.3f} "
            f"[ar {r.timings['ar']:.2f} s, nar {r.timings['nar']:.2f} s, vocoder {r.timings['vocoder']:.2f} s]")


def _attempt(fn, *args):
    try:
        return fn(*args)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        return e


def main(argv=None) -> int:
    import soundfile as sf

    from flexitrain.tts.pipeline import TTSRequest, summarise

    args = build_parser().parse_args(argv)
    if not args.batch and not (args.text and args.prompt_wav):
        print("error: give --text and --prompt-wav (and --prompt-text), or --batch FILE", file=sys.stderr)
        return 2
    try:
        requests = (read_batch(args.batch, args) if args.batch else
                    [TTSRequest(args.text, args.prompt_wav, args.prompt_text, language=args.language,
                                frame_rate=args.frame_rate, threshold=args.threshold, seed=args.seed, id="tts")])
        tts = build_pipeline(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = []
    out_dir = Path(args.out_dir)
    if args.batch:
        out_dir.mkdir(parents=True, exist_ok=True)
    records, failed = [], []
    outcomes = (tts.synthesize_batch(requests, max_batch=args.ar_batch) if args.batch else
                [_attempt(tts.synthesize_request, requests[0])])
    for req, r in zip(requests, outcomes):
        if isinstance(r, Exception):  # one bad item does not lose the others
            print(f"error: {req.id}: {r}", file=sys.stderr, flush=True)
            failed.append(req.id)
            continue
        results.append(r)
        path = out_dir / f"{req.id}.wav" if args.batch else Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), r.audio.numpy(), r.sample_rate)
        print(_line(str(path), r), flush=True)
        records.append({"id": req.id, "wav": str(path), "text": req.text, "seconds": r.seconds,
                        "tokens": r.tokens.numel(), "frame_rate": r.frame_rate, "threshold": r.threshold,
                        "rtf": r.rtf, "timings": r.timings, "stopped_by_eos": r.stopped_by_eos})
    if args.batch:
        with open(out_dir / "results.jsonl", "w") as fh:
            fh.writelines(json.dumps(rec) + "\n" for rec in records)
    s = summarise(results)
    print(f"{s['utterances']} utterance(s), {s['audio_seconds']:.2f} s of audio in {s['synthesis_seconds']:.2f} s: "
          f"RTF {s['rtf']:.3f}, mean frame rate {s['frame_rate']:.2f} Hz"
          + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
