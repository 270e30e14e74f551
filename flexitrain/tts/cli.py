"""`flexitrain-tts`: zero-shot FlexiCodec-TTS from local checkpoints (AR → NAR → Vocos, 24 kHz output).

One utterance:
    flexitrain-tts --ar AR --nar NAR --vocoder VOCOS --text "Hello." --prompt-wav ref.wav \\
        --prompt-text "Words of the prompt." --frame-rate 8.3 --out hello.wav
Batch (a JSON-lines file: {"text", "prompt_wav", "prompt_text", optional "id", "language", "frame_rate"}; a row
with "source_wav" instead of "text" is resynthesised):
    flexitrain-tts --ar AR --nar NAR --vocoder VOCOS --batch items.jsonl --out-dir out/
AR only (official use_nar=False): the AR tokens through the codec's own decoder, 16 kHz, no NAR / vocoder:
    flexitrain-tts --ar AR --ar-only --text "Hello." --prompt-wav ref.wav --out hello16k.wav
No duration prediction (official predict_duration=False): every generated token is one 12.5 Hz frame:
    flexitrain-tts --ar AR --nar NAR --vocoder VOCOS --no-duration-prediction --threshold 1.0 ...
Resynthesis (official infer_voicebox_tts): SOURCE's codec tokens rendered by the NAR in the prompt's voice:
    flexitrain-tts --nar NAR --vocoder VOCOS --resynthesize source.wav --prompt-wav ref.wav --out resynth.wav

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
    m.add_argument("--ar", help="AR text→token model (not needed for --resynthesize)")
    m.add_argument("--nar", help="Voicebox NAR token→mel model (not needed for --ar-only)")
    m.add_argument("--vocoder", help="Vocos 24 kHz vocoder (not needed for --ar-only)")
    m.add_argument("--codec", default=None, help="FlexiCodec for the prompt (default: the AR checkpoint's)")
    m.add_argument("--teacher-dir", default=None, help="SenseVoiceSmall directory (with an exported --codec)")
    m.add_argument("--device", default="cpu")
    i = p.add_argument_group("input")
    i.add_argument("--text", help="text to speak")
    i.add_argument("--prompt-wav", help="a few seconds of the target voice")
    i.add_argument("--prompt-text", default="", help="transcript of the prompt")
    i.add_argument("--batch", help="JSON-lines file of utterances (instead of --text/--prompt-*)")
    i.add_argument("--language", default="en", help="whisper code: en, zh, de, fr, ... (G2P languages: see errors)")
    i.add_argument("--zh-g2p", choices=("hanzi", "pinyin"), default="hanzi",
                   help="Chinese text: hanzi to the BPE (official training) or pypinyin tone-numbered pinyin")
    i.add_argument("--no-g2p", action="store_true", help="feed the raw text to the BPE (models trained without G2P)")
    i.add_argument("--resynthesize", metavar="SOURCE_WAV",
                   help="NAR-only: resynthesise this audio in the voice of --prompt-wav (no AR, no text)")
    i.add_argument("--frame-rate", type=float, default=8.3, help="tokens/s: 12.5, 8.3 or 6.25 (see --frame-rates)")
    i.add_argument("--threshold", type=float, default=None, help="merging threshold (overrides --frame-rate)")
    i.add_argument("--frame-rates", default=None,
                   help='JSON map of frame rate (Hz) → threshold, default {"12.5": 1.0, "8.3": 0.91, "6.25": 0.86}')
    o = p.add_argument_group("output")
    o.add_argument("--out", default="tts.wav", help="output wav (single utterance)")
    o.add_argument("--out-dir", default="tts_out", help="output folder (batch): <id>.wav + results.jsonl")
    o.add_argument("--ar-batch", type=int, default=16, help="utterances decoded together (batch mode): the AR, and the NAR with --nar-batch")
    o.add_argument("--ar-only", action="store_true",
                   help="decode the AR tokens with the codec's own decoder (16 kHz); no NAR / vocoder")
    s = p.add_argument_group("sampling")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--top-k", type=int, default=25)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--no-duration-prediction", action="store_true",
                   help="do not predict durations: every generated token is one 12.5 Hz frame")
    s.add_argument("--duration-top-k", type=int, default=1)
    s.add_argument("--duration-temperature", type=float, default=1.0)
    s.add_argument("--max-token-text-ratio", type=float, default=20.0, help="length cap: tokens per text id")
    s.add_argument("--min-token-text-ratio", type=float, default=0.0, help="no EOS before this many tokens per text id")
    s.add_argument("--min-prompt-pace", type=float, default=0.0,
                   help="> 0: no EOS before this fraction of the prompt's tokens-per-text-id pace (weak demo models)")
    s.add_argument("--compile-step", action="store_true",
                   help="torch.compile the AR per-token step over a static KV cache (CUDA: CUDA graphs via "
                        "mode=reduce-overhead); greedy tokens are unchanged; compiles on the first utterance")
    s.add_argument("--check-every", type=int, default=16,
                   help="AR steps between the host's looks for end of sequence (one device sync each)")
    s.add_argument("--steps", type=int, default=15, help="NAR Euler steps")
    s.add_argument("--cfg", type=float, default=2.0, help="NAR classifier-free guidance strength")
    s.add_argument("--rescale-cfg", type=float, default=0.75)
    s.add_argument("--nar-batch", choices=("auto", "on", "off"), default="auto",
                   help="batch mode: sample the chunk's mels together, one NAR call per Euler step (on), or per "
                        "utterance (off); auto = together except on the CPU, where padding costs more than it saves")
    s.add_argument("--nar-compile", action="store_true",
                   help="torch.compile the NAR velocity model (pays off over many utterances on a GPU)")
    return p


def _relative_to(batch_file: str | Path, wav: str) -> Path:
    """A path in a batch file is relative to that file's folder."""
    p = Path(wav)
    return p if p.is_absolute() else Path(batch_file).parent / p


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
        missing = [k for k in ("source_wav" if row.get("source_wav") else "text", "prompt_wav") if not row.get(k)]
        if missing:
            raise ValueError(f"{path}:{n}: missing {', '.join(missing)}")
        prompt, source = (_relative_to(path, row[k]) if row.get(k) else None for k in ("prompt_wav", "source_wav"))
        requests.append(TTSRequest(text=row.get("text", ""), prompt_wav=prompt, prompt_text=row.get("prompt_text", ""),
                                   language=row.get("language", args.language),
                                   frame_rate=row.get("frame_rate", args.frame_rate),
                                   # a row's own frame rate wins over the command line's --threshold
                                   threshold=row.get("threshold", None if "frame_rate" in row else args.threshold),
                                   seed=args.seed, id=str(row.get("id", f"utt{n:05d}")), ar_only=args.ar_only,
                                   predict_duration=not args.no_duration_prediction, source_wav=source))
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
                              min_token_text_ratio=args.min_token_text_ratio, compile_step=args.compile_step,
                              check_every=args.check_every)
    return TTSPipeline.from_checkpoints(args.ar, args.nar, args.vocoder, codec=args.codec, teacher=teacher,
                                        frame_rates=frame_rates, sampling=sampling,
                                        nar_config=NARConfig(args.steps, args.cfg, args.rescale_cfg,
                                                             {"auto": None, "on": True, "off": False}[args.nar_batch],
                                                             args.nar_compile), device=args.device,
                                        min_prompt_pace=args.min_prompt_pace, zh_g2p=args.zh_g2p,
                                        g2p=not args.no_g2p)


def _resynthesis_problem(args) -> str | None:
    if args.batch or args.text:
        return "--resynthesize takes one source wav and no --text/--batch (batch rows: use \"source_wav\")"
    if args.ar_only or args.no_duration_prediction:
        return ("--resynthesize renders the source's own tokens and durations with the NAR: it does not go "
                "with --ar-only or --no-duration-prediction")
    if not args.prompt_wav:
        return "--resynthesize needs --prompt-wav (the voice to render the source in)"
    if not (args.nar and args.vocoder):
        return "--resynthesize needs --nar and --vocoder"
    return None


def _language_problem(args) -> str | None:
    """Checked before any model is loaded: a language without a reliable G2P fails at once."""
    from flexitrain.text.mandarin import _pypinyin
    from flexitrain.text.phonemize import MANDARIN, Phonemizer

    if args.no_g2p:
        return None
    try:
        if Phonemizer.voice_for(args.language) == MANDARIN and args.zh_g2p == "pinyin":
            _pypinyin()
    except (ValueError, ImportError) as e:
        return str(e)
    return None


def check_args(args) -> str | None:
    """What is wrong with this combination of options (None: nothing)."""
    if args.resynthesize:
        return _resynthesis_problem(args)
    if not args.batch and not (args.text and args.prompt_wav):
        return "give --text and --prompt-wav (and --prompt-text), or --batch FILE, or --resynthesize SOURCE_WAV"
    problem = _language_problem(args)
    if problem or args.batch:  # batch rows are checked one by one (each may be a resynthesis)
        return problem
    if not args.ar:
        return "text-to-speech needs --ar"
    if not args.ar_only and not (args.nar and args.vocoder):
        return "text-to-speech needs --nar and --vocoder (or --ar-only: the codec's decoder, 16 kHz)"
    return None


def _line(name: str, r) -> str:
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in r.timings.items() if k not in ("total", "prompt"))
    return (f"{name}: {r.seconds:.2f} s at {r.sample_rate} Hz ({r.mode}), {r.tokens.numel()} tokens, frame rate "
            f"{r.frame_rate:.2f} Hz (τ={r.threshold:g}{'' if r.stopped_by_eos else ', length cap'}), RTF {r.rtf:.3f} "
            f"[{stages}]")


def _attempt(fn, *args):
    try:
        return fn(*args)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        return e


def main(argv=None) -> int:
    import soundfile as sf

    from flexitrain.tts.pipeline import TTSRequest, summarise

    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        requests = (read_batch(args.batch, args) if args.batch else
                    [TTSRequest(args.text or "", args.prompt_wav, args.prompt_text, language=args.language,
                                frame_rate=args.frame_rate, threshold=args.threshold, seed=args.seed, id="tts",
                                ar_only=args.ar_only, predict_duration=not args.no_duration_prediction,
                                source_wav=args.resynthesize)])
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
        records.append({"id": req.id, "wav": str(path), "text": req.text, "mode": r.mode,
                        "sample_rate": r.sample_rate, "seconds": r.seconds,
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
