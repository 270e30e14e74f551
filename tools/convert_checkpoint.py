#!/usr/bin/env python
"""Convert a trusted checkpoint written before flexitrain stored plain containers, so that it loads with
``torch.load(weights_only=True)`` (what every flexitrain loader uses).

    python tools/convert_checkpoint.py runs/ar_tts_demo/main/checkpoints/last.ckpt --out last.converted.ckpt
    python tools/convert_checkpoint.py runs/ar_tts_demo/main/checkpoints/last.ckpt --in-place   # keeps .orig

Run it on purpose, on a file you trust (your own runs, a colleague's). Even so, nothing in the file runs: it is
read weights-only with a named allow-list of the harmless types older checkpoints hold (omegaconf DictConfig /
ListConfig and their nodes, numpy arrays and scalars, pathlib paths, Lightning's AttributeDict, typing.Any,
collections.defaultdict), which are then turned into plain dicts, lists, tensors and numbers. A file that
references anything else (``os.system``, a pickled class of another program, ...) is refused and listed.
The converted file is re-read weights-only before it is written (atomically: a temporary file, then a rename).
Exit status: 0 converted (or nothing to convert), 2 refused or unreadable.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flexitrain.utils.safe_load import (CheckpointError, check_file, checkpoint_task,  # noqa: E402
                                        convertible_global_names, convertible_globals, format_keys,
                                        plain_checkpoint, safe_torch_load, to_plain, unsafe_globals)


def convert(src: str | Path, out: str | Path) -> dict:
    """Read ``src`` with the named allow-list, make it plain, verify and write ``out``. Raises CheckpointError."""
    src, out = check_file(src), Path(out)
    try:
        safe_torch_load(src)
        already = True
    except CheckpointError:
        already = False
    bad = unsafe_globals(src)
    if bad is None and not already:
        safe_torch_load(src)  # raises the corrupt / truncated error
    refused = [g for g in (bad or []) if g not in convertible_global_names()]
    if refused:
        raise CheckpointError(src, f"not converted: it references {format_keys(refused)}, which is not one of the "
                                   f"types older flexitrain checkpoints hold; nothing was run")
    try:
        with torch.serialization.safe_globals(convertible_globals()):
            ckpt = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file
        raise CheckpointError(src, f"cannot be read: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(src, f"holds a {type(ckpt).__name__}, not a checkpoint dict")
    task = checkpoint_task(ckpt)
    plain_checkpoint(ckpt, task)
    problems: list[str] = []
    to_plain(ckpt, "checkpoint", problems)
    if problems:
        raise CheckpointError(src, f"not converted: entries that cannot be made plain: {format_keys(problems)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(ckpt, tmp)
    try:
        safe_torch_load(tmp)  # the point of it all: the result loads weights-only
    except CheckpointError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return {"src": str(src), "out": str(out), "task": task, "converted_types": sorted(bad or []),
            "already_plain": already}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="the trusted .ckpt to convert")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="where to write the converted checkpoint")
    group.add_argument("--in-place", action="store_true",
                       help="replace the file (the original is kept as <name>.orig)")
    args = ap.parse_args(argv)
    src = args.checkpoint
    try:
        if args.in_place:
            backup = src.with_name(src.name + ".orig")
            if backup.exists():
                raise CheckpointError(src, f"not converted: the backup {backup} already exists")
            check_file(src)
            tmp_out = src.with_name(src.name + ".converted")
            report = convert(src, tmp_out)
            os.replace(src, backup)
            os.replace(tmp_out, src)
            report.update(out=str(src), original=str(backup))
        else:
            report = convert(src, args.out)
    except (CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if report["already_plain"]:
        print(f"{src} already loads weights-only; written unchanged in content to {report['out']}")
    else:
        print(f"converted {src} -> {report['out']} (task: {report['task'] or 'unknown'}; made plain: "
              f"{format_keys([g for g in report['converted_types'] if not g.startswith('builtins.')])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
