#!/usr/bin/env python
"""Check flexitrain's FlexiCodec against reference vectors recorded from the official code.

Usage: python tools/parity.py REF_DIR [--tol 1e-4] [--masked] [--threads N]

REF_DIR is laid out like ``../shared/reference/flexicodec_tiny``: ``reference_cases.json``
(``config`` = official constructor kwargs, ``cases``), ``official_state_dict.safetensors`` and
``reference_io.safetensors``. The model is built from the recorded config, the official state
dict is loaded strictly, and each case is encoded (teacher features given) and decoded from its
codes. Exit status 0 only if every case's codes and token lengths are identical and the audio is
within ``--tol``. The last line is ``parity: K/N cases match, max |Δaudio| = X``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexitrain.models.codec.checkpoint import load_state_dict_strict  # noqa: E402
from flexitrain.models.codec.flexicodec import FlexiCodec  # noqa: E402


def run_case(model: FlexiCodec, io: dict, case: dict, masked: bool):
    audio, semantic = io[case["audio"]], io[case["semantic"]]
    tokens = model.encode(audio, sample_rate=model.sample_rate, threshold=case["threshold"],
                          num_quantizers=case["num_quantizers"], semantic_features=semantic,
                          use_padding_mask=masked)
    with torch.no_grad():
        audio_out = model.decode_codes(tokens.semantic_codes, tokens.acoustic_codes, tokens.token_lengths,
                                       use_padding_mask=masked)
    return tokens, audio_out


def compare(name: str, got: torch.Tensor | None, ref: torch.Tensor | None, problems: list[str]) -> None:
    if ref is None and got is None:
        return
    if ref is None or got is None:
        problems.append(f"{name}: expected {'nothing' if ref is None else tuple(ref.shape)}, got "
                        f"{'nothing' if got is None else tuple(got.shape)}")
        return
    ref = ref.reshape(got.shape) if ref.numel() == got.numel() else ref
    if got.shape != ref.shape:
        problems.append(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    elif not torch.equal(got.long(), ref.long()):
        n = int((got.long() != ref.long()).sum())
        problems.append(f"{name}: {n}/{ref.numel()} values differ")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("ref_dir", type=Path)
    ap.add_argument("--tol", type=float, default=1e-4, help="max |Δaudio| allowed (default 1e-4)")
    ap.add_argument("--masked", action="store_true",
                    help="run the padding-masked path of the new API instead of the official one")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0 = default; 1 is faster for tiny configs on busy machines)")
    args = ap.parse_args(argv)
    from safetensors.torch import load_file

    if args.threads:
        torch.set_num_threads(args.threads)

    spec = json.loads((args.ref_dir / "reference_cases.json").read_text())
    torch.manual_seed(spec.get("seed", 0))
    model = FlexiCodec(**spec["config"])
    state = load_file(str(args.ref_dir / "official_state_dict.safetensors"))
    load_state_dict_strict(model, state)
    model.eval()
    io = load_file(str(args.ref_dir / "reference_io.safetensors"))

    n_ok, max_diff = 0, 0.0
    cases = spec["cases"]
    for case in cases:
        key = case["key"]
        problems: list[str] = []
        tokens, audio_out = run_case(model, io, case, args.masked)
        sem = tokens.semantic_codes
        compare("semantic_codes", sem, io.get(f"{key}_semantic_codes"), problems)
        compare("acoustic_codes", tokens.acoustic_codes, io.get(f"{key}_acoustic_codes"), problems)
        if f"{key}_token_lengths" in io:
            compare("token_lengths", tokens.token_lengths, io[f"{key}_token_lengths"], problems)
        for field, want in (("groups", tokens.token_lengths.shape[-1]), ("frames", int(tokens.num_frames.max()))):
            if field in case and case[field] != want:
                problems.append(f"{field}: {want} != reference {case[field]}")
        ref_audio = io[f"{key}_audio_out"]
        if ref_audio.shape != audio_out.shape:
            problems.append(f"audio_out: shape {tuple(audio_out.shape)} != reference {tuple(ref_audio.shape)}")
            diff = float("inf")
        else:
            diff = float((audio_out - ref_audio).abs().max()) if ref_audio.numel() else 0.0
            if not diff <= args.tol:
                problems.append(f"audio_out: max |Δ| {diff:.3g} > {args.tol:g}")
        max_diff = max(max_diff, diff)
        status = "ok" if not problems else "FAIL: " + "; ".join(problems)
        print(f"{key}: G={tokens.token_lengths.shape[-1]} |Δaudio|={diff:.2e} {status}")
        n_ok += not problems
    print(f"parity: {n_ok}/{len(cases)} cases match, max |Δaudio| = {max_diff:.3g}")
    return 0 if n_ok == len(cases) and cases else 1


if __name__ == "__main__":
    sys.exit(main())
