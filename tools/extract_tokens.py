"""Pre-extract AR-TTS targets: FlexiCodec semantic codes + token lengths (durations) per merging threshold,
written into copies of WebDataset shards beside the audio.

    python tools/extract_tokens.py --shards data/demo/train --out data/demo_tokens/train \
        --ckpt runs/codec_demo/main/checkpoints/last.ckpt --thresholds 0.86 0.91 [--teacher-random-init] \
        [--acoustic --num-quantizers 8]

Every input shard ``<name>.tar`` becomes ``<out>/<name>.tar`` with all original members plus
``<key>.tokens.json``::

    {"codec": "<ckpt path>", "sample_rate": 16000,
     "t0.86": {"codes": [...], "durations": [...]}, "t0.91": {...}}

(``durations`` = 12.5 Hz frames merged into each token, 1..8). ``--acoustic`` also writes the RVQ codes of each
token, ``"acoustic": [[...] * n] * (Q - 1)`` per threshold, and ``"num_quantizers": Q`` (``--num-quantizers``,
counting the semantic codebook); codes and durations are the same as without it. ``index.json`` is copied when
present.
Shards are written under a temporary name and renamed when complete; existing outputs are skipped, so an
interrupted run can be restarted. The codec runs in eval mode in fp32 (``--dtype bf16``: autocast) with padding
masks, items batched by similar length (within a shard); the teacher runs once per batch for all thresholds. On
CUDA, batch lengths are rounded up to whole seconds (``--pad-seconds``) so that shapes repeat and
``cudnn.benchmark`` (on by default there) tunes each shape once; the padding is masked, so codes do not depend on
it beyond float rounding of the teacher features.

``--workers N`` (default min(4, CPUs); 0 = in this process) DataLoader worker processes read and decode whole
shards (flexitrain.data.decode) and cut them into padded batches, so the main process only runs the teacher and
the codec; shards arrive, and are written (by a background thread), in input order, so the output is the same
for any ``--workers``. Bad input is reported and skipped, never fatal: a sample whose audio does not decode
(corrupt, truncated, empty, NaN) keeps its members but gets no ``tokens.json``; an unreadable shard gets no output
(and ``index.json`` is then not copied). At the end a ``summary:`` line gives hours of audio per hour of wall time
and the main process's time split -- waiting for decoded shards (raise ``--workers`` if large), teacher, codec --
followed by the stats as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import shutil
import sys
import tarfile
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexitrain.data.decode import DecodeConfig, decode_audio  # noqa: E402
from flexitrain.data.pipeline import _shm_free_bytes, ignore_job_signals  # noqa: E402
from flexitrain.data.stats import SKIP_REASONS  # noqa: E402
from flexitrain.data.worker_exit import track_workers  # noqa: E402
from flexitrain.tasks.ar_tts_data import TOKENS_MEMBER, threshold_key  # noqa: E402

log = logging.getLogger("extract_tokens")


def read_shard(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """[(key, {ext: bytes})] in file order (local tar files)."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name
            slash = base.rfind("/") + 1
            dot = base.find(".", slash)
            key, ext = (base, "") if dot < 0 else (base[:dot], base[dot + 1:])
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(member).read()
    return samples


class _Counts(Counter):
    """The `DataStats.add` interface of flexitrain.data.decode, counting into a Counter; `last` = the latest reason."""

    last = ""

    def add(self, name: str, n: int = 1) -> None:
        self[name] += n
        self.last = name


# Everything the codec can take is kept, as before bad input was checked: no length or silence limits; undecodable,
# truncated, empty or non-finite audio is skipped (reported, no tokens.json for that sample).
def decode_config(sample_rate: int) -> DecodeConfig:
    return DecodeConfig(sample_rate=sample_rate, crop_samples=None, random_crop=False, max_duration=math.inf,
                        min_duration=0.0, silence_threshold=-1.0)


def prepare_shard(samples, sample_rate: int = 16000, batch_seconds: float = 120.0, pad_multiple: int = 0) -> dict:
    """Decode a shard's samples and cut them into padded batches of similar length (total samples up to
    ``batch_seconds``): ``{"batches": [(keys, offset, B, T, lengths)], "audio": float32 [sum B*T]`` (every
    batch's zero-padded ``[B, T]`` block from ``offset``), ``"skipped": [(key, reason)], "counts": Counter,
    "audio_seconds"}``. ``pad_multiple`` > 0: T is rounded up to a multiple of it, so that batch shapes repeat
    across batches and shards (what cudnn.benchmark's per-shape autotuning needs); which items share a batch
    does not change. Runs in the loader workers."""
    cfg, counts = decode_config(sample_rate), _Counts()
    audio, skipped = {}, []
    for key, members in samples:
        data = members.get("flac") or members.get("wav")
        if data is None:
            continue  # no audio member: no tokens (as always), not counted as bad input
        decoded = decode_audio(data, cfg, counts)
        if decoded is None:
            skipped.append((key, counts.last))
            audio.pop(key, None)
        else:
            audio[key] = decoded[0]
    order = sorted(audio, key=lambda k: len(audio[k]))
    batches, offset, start = [], 0, 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * len(audio[order[end]]) <= batch_seconds * sample_rate:
            end += 1
        keys = order[start:end]
        lengths = [len(audio[k]) for k in keys]
        t = max(lengths) if pad_multiple <= 0 else -(-max(lengths) // pad_multiple) * pad_multiple
        batches.append((keys, offset, len(keys), t, lengths))
        offset += len(keys) * t
        start = end
    flat = np.zeros(offset, dtype=np.float32)
    for keys, off, b, t, lengths in batches:
        block = flat[off: off + b * t].reshape(b, t)
        for i, k in enumerate(keys):
            block[i, : lengths[i]] = audio[k]
    return {"batches": batches, "audio": flat, "skipped": skipped, "counts": counts,
            "audio_seconds": sum(len(x) for x in audio.values()) / sample_rate}


def _targets(codec, audio, lengths, threshold, num_quantizers, semantic, semantic_lengths):
    """`codec_targets` (same post-processing) for given teacher features, plus with ``num_quantizers > 1`` the RVQ
    codes ``[B, num_quantizers - 1, T]`` from the same encode (the RVQ runs after the semantic codes and the
    grouping, so those are the same as with ``num_quantizers=1``)."""
    out = codec.encode(audio, lengths, threshold=threshold, num_quantizers=num_quantizers,
                       semantic_features=semantic, semantic_lengths=semantic_lengths)
    codes = out.semantic_codes[:, 0] if out.semantic_codes.dim() == 3 else out.semantic_codes
    num = out.num_tokens.long()
    t = int(num.max())
    valid = torch.arange(t, device=num.device) < num.unsqueeze(1)
    acoustic = out.acoustic_codes[..., :t].long() * valid.unsqueeze(1) if num_quantizers > 1 else None
    return codes[:, :t].long() * valid, out.token_lengths[:, :t].long() * valid, num, acoustic


@torch.no_grad()
def encode_prepared(prepared: dict, codec, teacher, thresholds: list[float], device: str = "cpu",
                    acoustic: int | None = None, timing: dict | None = None, dtype: str = "fp32") -> dict[str, dict]:
    """{key: tokens-json dict} for a `prepare_shard` result. The teacher runs once per batch (its features do not
    depend on the threshold); ``timing`` gets the seconds spent in "teacher" and "codec" added. ``dtype`` "bf16":
    teacher and codec under bf16 autocast (faster on a GPU; codes may then differ from fp32's)."""
    timing = {} if timing is None else timing
    kind = torch.device(device).type
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    amp = torch.autocast(kind, dtype=torch.bfloat16, enabled=dtype == "bf16")
    flat = torch.as_tensor(prepared["audio"])
    out: dict[str, dict] = {}
    for keys, off, b, t, lengths in prepared["batches"]:
        for k in keys:
            out[k] = {}
        wav = flat[off: off + b * t].view(b, t).to(device)
        lengths = torch.tensor(lengths).to(device)
        t0 = time.perf_counter()
        semantic = semantic_lengths = None
        if teacher is not None:
            with amp:
                semantic, semantic_lengths = teacher(wav, lengths)
            sync()
        t1 = time.perf_counter()
        timing["teacher"] = timing.get("teacher", 0.0) + t1 - t0
        for thr in thresholds:
            with amp:
                codes, durations, num, rvq = _targets(codec, wav, lengths, thr, acoustic or 1, semantic,
                                                      semantic_lengths)
            codes, durations, num = codes.tolist(), durations.tolist(), num.tolist()
            rvq = rvq.tolist() if rvq is not None else None
            for i, k in enumerate(keys):
                n = num[i]
                out[k][threshold_key(thr)] = {"codes": codes[i][:n], "durations": durations[i][:n]}
                if acoustic:
                    out[k][threshold_key(thr)]["acoustic"] = [row[:n] for row in rvq[i]]
                    out[k]["num_quantizers"] = acoustic
        timing["codec"] = timing.get("codec", 0.0) + time.perf_counter() - t1
    return out


def extract_samples(samples, codec, teacher, thresholds: list[float], sample_rate: int = 16000,
                    batch_seconds: float = 120.0, device: str = "cpu", acoustic: int | None = None) -> dict[str, dict]:
    """{key: tokens-json dict} for samples with decodable audio; batches of similar length up to ``batch_seconds``.
    ``acoustic``: also the RVQ codes of that many codebooks (counting the semantic one, >= 2)."""
    return encode_prepared(prepare_shard(samples, sample_rate, batch_seconds), codec, teacher, thresholds, device,
                           acoustic)


def write_shard(path: Path, samples, tokens: dict[str, dict], codec_id: str, sample_rate: int) -> int:
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    with tarfile.open(tmp, "w") as tar:
        for key, members in samples:
            members = dict(members)
            if key in tokens:
                members[TOKENS_MEMBER] = json.dumps({"codec": codec_id, "sample_rate": sample_rate,
                                                     **tokens[key]}).encode()
                written += 1
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}" if ext else key)
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return written


class ShardReader(Dataset):
    """Shard i -> its samples (raw members, for the output) + `prepare_shard`'s decoded batches, or the error that
    made it unreadable. One shard per loader task: the DataLoader delivers them in shard order whatever the
    number of workers, so the output does not depend on it."""

    def __init__(self, shards: list[Path], sample_rate: int, batch_seconds: float, num_workers: int = 0,
                 pad_multiple: int = 0):
        self.shards, self.sample_rate, self.batch_seconds = list(shards), sample_rate, batch_seconds
        self.num_workers, self.pad_multiple = num_workers, pad_multiple

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> dict:
        start = time.perf_counter()
        try:
            samples = read_shard(self.shards[i])
        except Exception as e:  # noqa: BLE001 - an unreadable (truncated, not a tar) shard is reported, not fatal
            return {"index": i, "error": f"{type(e).__name__}: {e}", "decode_seconds": time.perf_counter() - start}
        prepared = prepare_shard(samples, self.sample_rate, self.batch_seconds, self.pad_multiple)
        prepared["audio"] = self._share(prepared["audio"])
        return {"index": i, "error": None, "samples": samples, **prepared,
                "decode_seconds": time.perf_counter() - start}

    def _share(self, audio: np.ndarray):
        """A tensor (sent through shared memory) when /dev/shm has room for every worker's queued shards, else the
        array (pickled through the worker's pipe: slower, but a small /dev/shm, e.g. docker's 64 MB, would fail)."""
        if get_worker_info() is None:
            return audio
        queued = (PREFETCH + 1) * max(1, self.num_workers)
        return torch.from_numpy(audio) if audio.nbytes * queued <= 0.5 * _shm_free_bytes() else audio


PREFETCH = 2  # shards queued per worker


def _as_is(item):
    return item


def _stop(iterator) -> None:
    """Stop a loader iterator's workers now (an error in the main process): they ignore SIGTERM (job signals are
    left to the main process), so any still busy reading are killed (as `worker_exit.stop_live_workers` does at
    exit)."""
    try:
        iterator._shutdown_workers()
    except Exception:  # noqa: BLE001
        pass
    for worker in getattr(iterator, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join(5)


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def extract_dir(shards: list[Path], out_dir: Path, codec, teacher, thresholds: list[float], codec_id: str,
                sample_rate: int = 16000, batch_seconds: float = 120.0, device: str = "cpu",
                acoustic: int | None = None, workers: int = 0, report: dict | None = None,
                pad_seconds: float = 0.0, dtype: str = "fp32") -> dict:
    """Tokenise every shard that has no output yet; returns ``{"shards", "skipped_existing", "items"}``.
    ``workers`` > 0: shards are read and decoded in that many DataLoader worker processes (0: in this process),
    the output is the same. ``pad_seconds``: batch lengths rounded up to a multiple of it (see `prepare_shard`);
    ``dtype``: see `encode_prepared`. ``report`` (a dict) gets the details: audio seconds, skipped samples by reason,
    unreadable shards and the time split (see `format_summary`)."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {"shards": 0, "skipped_existing": 0, "items": 0}
    todo = [s for s in shards if not (out_dir / s.name).exists()]
    stats["skipped_existing"] = len(shards) - len(todo)
    timing = {"wait": 0.0, "teacher": 0.0, "codec": 0.0, "write": 0.0, "decode_in_workers": 0.0}
    skipped, repaired, bad_shards, audio_seconds = Counter(), Counter(), [], 0.0
    workers = min(max(0, int(workers)), len(todo))

    def write(target: Path, samples, tokens: dict) -> int:
        t = time.perf_counter()
        n = write_shard(target, samples, tokens, codec_id, sample_rate)
        timing["write"] += time.perf_counter() - t
        log.info("%s: %d items", target, n)
        return n

    writer = ThreadPoolExecutor(1, thread_name_prefix="extract_tokens_writer")  # one: shards written in order
    pending: deque = deque()
    reader = ShardReader(todo, sample_rate, batch_seconds, workers, int(round(pad_seconds * sample_rate)))
    loader = DataLoader(reader, batch_size=None, shuffle=False,
                        num_workers=workers, collate_fn=_as_is,
                        **({"worker_init_fn": ignore_job_signals, "prefetch_factor": PREFETCH} if workers else {}))
    iterator = iter(loader) if todo else iter(())
    track_workers(iterator)  # stopped at interpreter exit if still running (they ignore SIGTERM)
    try:
        while True:
            t = time.perf_counter()
            item = next(iterator, None)
            timing["wait"] += time.perf_counter() - t
            if item is None:
                break
            shard = todo[item["index"]]
            if workers:
                timing["decode_in_workers"] += item["decode_seconds"]
            if item["error"] is not None:
                log.error("%s: unreadable shard, skipped (%s)", shard, item["error"])
                bad_shards.append(str(shard))
                continue
            for key, reason in item["skipped"]:
                log.warning("%s: %s: %s, skipped (no %s)", shard, key, reason, TOKENS_MEMBER)
                skipped[reason] += 1
            repaired.update({k: v for k, v in item["counts"].items() if k not in SKIP_REASONS})
            tokens = encode_prepared(item, codec, teacher, thresholds, device, acoustic, timing, dtype)
            audio_seconds += item["audio_seconds"]
            while len(pending) > 1:  # at most one shard waiting behind the one being written
                stats["items"] += pending.popleft().result()
            pending.append(writer.submit(write, out_dir / shard.name, item["samples"], tokens))
            stats["shards"] += 1
        while pending:
            stats["items"] += pending.popleft().result()
    except BaseException:
        _stop(iterator)
        raise
    finally:
        writer.shutdown(wait=True)  # a shard being written is finished (and renamed): it is complete
    index = shards[0].parent / "index.json" if shards else None
    if index is not None and index.exists():
        if all((out_dir / s.name).exists() for s in shards):
            shutil.copy(index, out_dir / "index.json")
        else:
            log.warning("index.json not copied: not every shard has an output yet")
    if report is not None:
        report.update(audio_seconds=audio_seconds, seconds=time.perf_counter() - start, workers=workers,
                      skipped=dict(skipped), repaired=dict(repaired), bad_shards=bad_shards, time=timing)
    return stats


def format_summary(stats: dict, report: dict) -> str:
    """One line: what was done, hours of audio per hour of wall time and where the time went."""
    wall, hours = report["seconds"], report["audio_seconds"] / 3600
    t = report["time"]
    other = max(0.0, wall - t["wait"] - t["teacher"] - t["codec"])

    def part(name, sec):
        return f"{name} {sec:.1f}s ({100 * sec / wall if wall > 0 else 0:.0f}%)"

    skipped = sum(report["skipped"].values())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(report["skipped"].items()))
    return (f"summary: {stats['shards']} shards ({stats['skipped_existing']} already done, "
            f"{len(report['bad_shards'])} unreadable), {stats['items']} items, {skipped} skipped"
            f"{f' ({reasons})' if reasons else ''}; {hours:.4f} h of audio in {wall:.1f}s = "
            f"{hours / (wall / 3600) if wall > 0 else 0.0:.1f} hours of audio per hour; main process: "
            f"{part('read/decode wait', t['wait'])}, {part('teacher', t['teacher'])}, {part('codec', t['codec'])}, "
            f"{part('other', other)}; write {t['write']:.1f}s (background thread)"
            + (f", decode {t['decode_in_workers']:.1f}s in {report['workers']} workers" if report["workers"] else ""))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="a folder of .tar shards or one .tar file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--ckpt", required=True, help="CodecTask checkpoint (.ckpt) or exported FlexiCodec folder")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.86, 0.91])
    p.add_argument("--teacher-dir", default=None, help="local SenseVoiceSmall folder (overrides the checkpoint's)")
    p.add_argument("--teacher-random-init", action="store_true", help="random teacher (demo codecs only)")
    p.add_argument("--teacher-blocks", type=int, default=2,
                   help="blocks of the random teacher (50 = SenseVoiceSmall's size, for speed figures)")
    p.add_argument("--batch-seconds", type=float, default=120.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes reading and decoding shards while the codec runs (default: min(4, CPUs)); "
                        "0: all in this process")
    p.add_argument("--acoustic", action="store_true", help="also write the acoustic (RVQ) codes")
    p.add_argument("--num-quantizers", type=int, default=8,
                   help="with --acoustic: codebooks counting the semantic one (8 = FSQ + 7 RVQ)")
    p.add_argument("--pad-seconds", type=float, default=None,
                   help="round each batch's length up to a multiple of this (default: 1.0 on CUDA, where repeating "
                        "shapes let cudnn.benchmark pay off; 0 = no rounding, the default on CPU)")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.backends.cudnn.benchmark (default: on with CUDA)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: teacher and codec under bf16 autocast (GPU; codes may differ from fp32's)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the codec's DAC encoder/decoder and bottleneck (default backend inductor; "
                        "padded lengths keep the shapes few; compiles on the first batches)")
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    pad_seconds = args.pad_seconds if args.pad_seconds is not None else (1.0 if cuda else 0.0)
    if pad_seconds < 0:
        raise SystemExit(f"--pad-seconds must be >= 0, got {args.pad_seconds}")
    torch.backends.cudnn.benchmark = cuda if args.cudnn_benchmark is None else args.cudnn_benchmark
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    src = Path(args.shards)
    shards = sorted(src.glob("*.tar")) if src.is_dir() else [src] if src.is_file() else []
    if not shards:
        raise SystemExit(f"no .tar shards under {src}")
    teacher_cfg = None
    if args.teacher_dir or args.teacher_random_init:
        teacher_cfg = {"model_dir": args.teacher_dir, "random_init": args.teacher_random_init,
                       "num_blocks": args.teacher_blocks if args.teacher_random_init else 50}
    from flexitrain.evaluation.loading import load_codec

    t = time.perf_counter()
    codec, teacher = load_codec(args.ckpt, teacher_cfg, device=args.device)
    load_seconds = time.perf_counter() - t
    compiled = []
    if args.compile:
        from flexitrain.tasks.compiling import codec_inference_targets, compile_modules, compile_options

        compiled = compile_modules(codec_inference_targets(codec), compile_options({"backend": args.compile}))
    if args.acoustic and not 2 <= args.num_quantizers <= codec.n_codebooks + 1:
        raise SystemExit(f"--num-quantizers {args.num_quantizers} must be in [2, {codec.n_codebooks + 1}] with "
                         "--acoustic for this codec (1 would be the semantic codes only)")
    print(f"settings: device {args.device}, dtype {args.dtype}, cudnn.benchmark {torch.backends.cudnn.benchmark}, "
          f"batch {args.batch_seconds:g} s of audio, lengths padded to multiples of {pad_seconds:g} s, "
          f"workers {args.workers}, compile {'+'.join(compiled) + ' (' + args.compile + ')' if compiled else 'off'}",
          flush=True)
    report: dict = {}
    stats = extract_dir(shards, Path(args.out), codec, teacher, args.thresholds, str(args.ckpt),
                        batch_seconds=args.batch_seconds, device=args.device,
                        acoustic=args.num_quantizers if args.acoustic else None, workers=args.workers, report=report,
                        pad_seconds=pad_seconds, dtype=args.dtype)
    print(format_summary(stats, report) + f"; model load {load_seconds:.1f}s", flush=True)
    t = report["time"]
    stats.update(
        skipped_items=sum(report["skipped"].values()), skipped=report["skipped"], repaired=report["repaired"],
        bad_shards=report["bad_shards"], workers=report["workers"], audio_seconds=round(report["audio_seconds"], 2),
        audio_hours=round(report["audio_seconds"] / 3600, 4),
        seconds=round(report["seconds"], 2),
        hours_per_hour=round(report["audio_seconds"] / report["seconds"], 2) if report["seconds"] > 0 else 0.0,
        time={k: round(v, 4) for k, v in t.items()}, load_seconds=round(load_seconds, 2))  # ms-scale stages stay > 0
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
