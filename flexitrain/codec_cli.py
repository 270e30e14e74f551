"""`flexitrain-codec`: FlexiCodec tokens from audio files and audio from token files (local models only).

    flexitrain-codec encode speech/ --model MODEL --out tokens/ [--threshold 0.91] [--num-quantizers 8]
    flexitrain-codec decode tokens/ --model MODEL --out wavs/ [--sample-rate 24000]

MODEL: an inference folder (config.yaml + model.safetensors from FlexiCodec.save_pretrained or
tools/import_official.py; encoding also needs --teacher-dir, or --teacher-random-init for demo codecs) or a
CodecTask .ckpt (brings its teacher settings). Inputs are files or folders (searched recursively); outputs keep the
folder layout. One token file per utterance (--format safetensors or npz) holds semantic_codes [G] (FSQ),
acoustic_codes [Q, G] (RVQ, Q = num_quantizers - 1), token_lengths [G] (80 ms frames per token), threshold,
num_quantizers, sample_rate and num_samples of the input, codec_sample_rate and model_hash.

Any length: audio is encoded / decoded in windows of --chunk-seconds with --overlap-seconds of overlap
(flexitrain/models/codec/long_audio.py), so memory does not grow with the length; inputs shorter than a window
give exactly FlexiCodec.encode / decode. Unreadable or failing files are reported and skipped; the exit status is
0 if at least one file was converted, 1 if none was, 2 for a usage error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")
TOKEN_EXTS = (".safetensors", ".npz")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexitrain-codec", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("encode", "audio files -> token files"), ("decode", "token files -> wav files")):
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("inputs", nargs="+", help="files or folders")
        s.add_argument("--model", required=True, help="inference folder or CodecTask .ckpt")
        s.add_argument("--out", required=True, help="output folder")
        s.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
        s.add_argument("--chunk-seconds", type=float, default=30.0, help="window length for long audio")
        s.add_argument("--overlap-seconds", type=float, default=4.0, help="overlap of neighbouring windows")
        s.add_argument("--teacher-dir", default=None, help="local SenseVoiceSmall folder (inference-folder models)")
        s.add_argument("--teacher-random-init", action="store_true", help="seeded random teacher (demo codecs)")
        s.add_argument("--teacher-blocks", type=int, default=2, help="blocks of the random teacher")
        if name == "encode":
            s.add_argument("--threshold", type=float, default=0.91,
                           help="merging threshold τ in [-1, 1] (1.0 = fixed 12.5 Hz)")
            s.add_argument("--num-quantizers", type=int, default=None,
                           help="codebooks incl. the semantic one (1 = semantic only); default min(8, all)")
            s.add_argument("--format", choices=("safetensors", "npz"), default="safetensors")
            s.add_argument("--batch-windows", type=int, default=8, help="windows encoded per model call")
            s.add_argument("--files-per-step", type=int, default=32, help="files read into memory at a time")
        else:
            s.add_argument("--sample-rate", type=int, default=None, help="output rate (default: the input's)")
            s.add_argument("--subtype", default="FLOAT", help="soundfile subtype (FLOAT is lossless; PCM_16, ...)")
            s.add_argument("--crossfade-seconds", type=float, default=1.0)
            s.add_argument("--ignore-model-hash", action="store_true",
                           help="decode token files written by another model")
    return p


# ----------------------------------------------------------------------------- token files
def save_tokens(path: Path, rec: dict) -> None:
    """``rec``: arrays (codes, lengths) and scalars; the model hash goes into the file's metadata / a string."""
    import numpy as np

    arrays = {k: np.asarray(v, order="C") for k, v in rec.items() if k != "model_hash"}  # (keeps 0-d)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp" + path.suffix)  # complete files only (np.savez keeps the suffix)
    if path.suffix == ".npz":
        np.savez(tmp, model_hash=np.array(rec["model_hash"]), **arrays)
    else:
        from safetensors.numpy import save_file

        meta = {k: str(v.item()) for k, v in arrays.items() if v.ndim == 0}
        save_file(arrays, str(tmp), metadata={**meta, "model_hash": rec["model_hash"], "producer": "flexitrain-codec"})
    tmp.replace(path)


def load_tokens(path: Path) -> dict:
    import numpy as np

    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            rec = {k: z[k] for k in z.files}
        rec["model_hash"] = str(rec["model_hash"])
    else:
        from safetensors import safe_open
        from safetensors.numpy import load_file

        rec = load_file(str(path))  # (safe_open.get_tensor returns 0-d arrays as [1])
        with safe_open(str(path), "np") as f:
            rec["model_hash"] = (f.metadata() or {}).get("model_hash", "")
    missing = [k for k in ("semantic_codes", "acoustic_codes", "token_lengths", "sample_rate", "num_samples")
               if k not in rec]
    if missing:
        raise ValueError(f"not a flexitrain-codec token file (missing {', '.join(missing)})")
    return rec


def tokens_record(tokens, threshold: float, num_quantizers: int, model_hash: str, codec_rate: int) -> dict:
    import numpy as np

    G = tokens.token_lengths.shape[-1]
    ac = tokens.acoustic_codes[0] if tokens.acoustic_codes is not None else np.zeros((0, G), dtype=np.int64)
    as_np = (lambda t: t.cpu().numpy().astype(np.int64) if hasattr(t, "cpu") else t)
    return {"semantic_codes": as_np(tokens.semantic_codes[0]), "acoustic_codes": as_np(ac),
            "token_lengths": as_np(tokens.token_lengths[0]), "threshold": np.array(float(threshold)),
            "num_quantizers": np.array(int(num_quantizers), dtype=np.int64),
            "sample_rate": np.array(int(tokens.sample_rate), dtype=np.int64),
            "num_samples": np.array(int(tokens.num_samples[0]), dtype=np.int64),
            "codec_sample_rate": np.array(int(codec_rate), dtype=np.int64), "model_hash": model_hash}


def record_tokens(rec: dict):
    """A token-file record -> batch-of-one CodecTokens."""
    import torch

    from flexitrain.models.codec.flexicodec import CodecTokens

    lengths = torch.from_numpy(rec["token_lengths"]).long()[None]
    G, sr, n = lengths.shape[1], int(rec["sample_rate"]), int(rec["num_samples"])
    ac = torch.from_numpy(rec["acoustic_codes"]).long()[None]
    rate = torch.tensor([G / (n / sr)], dtype=torch.float32)
    return CodecTokens(torch.from_numpy(rec["semantic_codes"]).long()[None], ac if ac.shape[1] else None, lengths,
                       torch.tensor([G]), lengths.sum(1), torch.tensor([n]), sr, rate, rate * 0)


# ----------------------------------------------------------------------------- helpers
def find_inputs(inputs: list[str], exts: tuple[str, ...]) -> list[tuple[Path, Path]]:
    """[(file, output path relative to --out without suffix)]: folders keep their layout below the folder."""
    found = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += [(f, f.relative_to(p).with_suffix("")) for f in sorted(p.rglob("*"))
                      if f.is_file() and f.suffix.lower() in exts]
        else:  # a missing file is reported as a failure, not dropped silently
            found.append((p, Path(p.stem)))
    return found


def progress(items, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="file", file=sys.stderr)
    except ImportError:  # plain fallback: one line per file
        def plain():
            for i, x in enumerate(items, 1):
                print(f"{desc} [{i}/{len(items)}] {x[0] if isinstance(x, tuple) else x}", file=sys.stderr)
                yield x
        return plain()


def load_model(args, parser, need_teacher: bool):
    """(codec, teacher or None, model hash); usage errors name the option."""
    from flexitrain.evaluation.loading import file_hash, load_codec
    from flexitrain.models.codec import FlexiCodec

    path = Path(args.model)
    if not path.exists():
        parser.error(f"--model {args.model!r} does not exist: give an inference folder (config.yaml + "
                     "model.safetensors) or a CodecTask .ckpt")
    teacher_cfg = None
    if args.teacher_dir or args.teacher_random_init:
        teacher_cfg = {"model_dir": args.teacher_dir, "random_init": args.teacher_random_init,
                       "num_blocks": args.teacher_blocks if args.teacher_random_init else 50}
    try:
        if path.is_dir() and not need_teacher:
            codec, teacher = FlexiCodec.from_pretrained(path, what="--model").eval().to(args.device), None
        else:
            if path.is_dir() and teacher_cfg is None:
                parser.error(f"--model {args.model!r} is an inference folder: encoding also needs --teacher-dir "
                             "(a local SenseVoiceSmall) or --teacher-random-init (demo codecs)")
            codec, teacher = load_codec(path, teacher_cfg, device=args.device)
    except (OSError, ValueError, RuntimeError) as err:
        parser.error(f"--model {args.model!r}: {err}")
    import torch

    if torch.device(args.device).type == "cuda":
        # Windows of --chunk-seconds, --batch-windows at a time: the same few shapes again and again, so
        # cuDNN's per-shape autotuning is paid once and then picks the fastest convolution kernels.
        torch.backends.cudnn.benchmark = True
    return codec, teacher, file_hash(path)


def _summary(command: str, ok: int, failures: list[tuple[str, str]]) -> int:
    for name, why in failures:
        print(f"skipped {name}: {why}", file=sys.stderr)
    print(json.dumps({"command": command, "ok": ok, "failed": len(failures),
                      "failures": [{"file": n, "error": w} for n, w in failures]}))
    return 0 if ok else 1


# ----------------------------------------------------------------------------- commands
def encode(args, parser) -> int:
    from flexitrain.audio.io import read_mono
    from flexitrain.models.codec.long_audio import _window_frames, encode_long_batch

    if not -1.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold {args.threshold} must be in [-1, 1] (a cosine similarity)")
    codec, teacher, model_hash = load_model(args, parser, need_teacher=True)
    nq_max = codec.n_codebooks + 1
    nq = min(8, nq_max) if args.num_quantizers is None else args.num_quantizers
    if not 1 <= nq <= nq_max:
        parser.error(f"--num-quantizers {nq} must be in [1, {nq_max}] for this model (1 = semantic only)")
    try:
        _window_frames(codec, args.chunk_seconds, args.overlap_seconds)
    except ValueError as err:
        parser.error(str(err).replace("chunk_seconds=", "--chunk-seconds ").replace("overlap_seconds=",
                                                                                      "--overlap-seconds "))
    files = find_inputs(args.inputs, AUDIO_EXTS)
    out_dir, suffix = Path(args.out), "." + args.format
    ok, failures = 0, []
    bar = progress(files, "encode")
    step: list = []

    def flush():
        nonlocal ok
        loaded = []
        for f, rel in step:
            try:
                loaded.append((f, rel, *read_mono(f)))
            except Exception as err:  # noqa: BLE001 -- unreadable: report, go on
                failures.append((str(f), f"unreadable audio: {err}"))
        results = encode_long_batch(codec, [x for _, _, x, _ in loaded], [sr for *_, sr in loaded],
                                    args.threshold, nq, teacher, args.chunk_seconds, args.overlap_seconds,
                                    args.batch_windows) if loaded else []
        for (f, rel, _, _), res in zip(loaded, results):
            if isinstance(res, Exception):
                failures.append((str(f), f"encoding failed: {res}"))
                continue
            try:
                save_tokens(out_dir / rel.with_suffix(suffix),
                            tokens_record(res, args.threshold, nq, model_hash, codec.sample_rate))
                ok += 1
            except OSError as err:
                failures.append((str(f), f"cannot write tokens: {err}"))
        step.clear()

    for item in bar:
        step.append(item)
        if len(step) >= args.files_per_step:
            flush()
    flush()
    if not files:
        failures.append((" ".join(args.inputs), f"no audio files ({', '.join(AUDIO_EXTS)})"))
    return _summary("encode", ok, failures)


def decode(args, parser) -> int:
    import soundfile as sf

    from flexitrain.models.codec.long_audio import decode_long

    codec, _, model_hash = load_model(args, parser, need_teacher=False)
    files = find_inputs(args.inputs, TOKEN_EXTS)
    out_dir = Path(args.out)
    ok, failures = 0, []
    for f, rel in progress(files, "decode"):
        try:
            rec = load_tokens(f)
            if rec["model_hash"] != model_hash and not args.ignore_model_hash:
                raise ValueError(f"written by model {rec['model_hash'] or '?'}, --model is {model_hash} "
                                 "(--ignore-model-hash to decode anyway)")
            audio = decode_long(codec, record_tokens(rec), args.sample_rate, args.chunk_seconds,
                                args.overlap_seconds, args.crossfade_seconds)
            target = out_dir / rel.with_suffix(".wav")
            target.parent.mkdir(parents=True, exist_ok=True)
            samples = audio.audio[0, 0, : int(audio.lengths[0])].cpu().numpy()
            sf.write(str(target), samples, audio.sample_rate, subtype=args.subtype)
            ok += 1
        except Exception as err:  # noqa: BLE001 -- report, go on with the next file
            failures.append((str(f), str(err) or type(err).__name__))
    if not files:
        failures.append((" ".join(args.inputs), f"no token files ({', '.join(TOKEN_EXTS)})"))
    return _summary("decode", ok, failures)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]  # errors print the subcommand's usage
    return (encode if args.command == "encode" else decode)(args, sub)


if __name__ == "__main__":
    sys.exit(main())
