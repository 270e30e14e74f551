#!/usr/bin/env python
"""Record the bundled parity vectors (``tests/data/parity``) from the official FlexiCodec code.

The official code is the ``flexicodec==0.1.2`` wheel from the package index. Its files are byte-identical to
``AmphionTeam/FlexiCodec`` at commit ``f52415cc043cf8bd6bcd65921edb8bb4241cf54a`` (checked file by file against
the git blobs of that commit with ``--official-git``), the commit the TTS vectors in ``../shared/reference`` were
recorded from. Every value stored under ``tests/data/parity`` is an input chosen here or an output of that
code: nothing from flexitrain is imported or run by this script.

Set-up (a temporary target next to flexitrain's venv, which provides torch==2.13.0, numpy, scipy, librosa,
soundfile, einops, safetensors, openai-whisper and tiktoken)::

    pip install --no-deps --target /tmp/flexicodec_official flexicodec==0.1.2 transformers==4.41.2 \\
        'huggingface_hub>=0.23,<1.0' tokenizers==0.19.1 funasr==1.4.16 kaldiio six easydict phonemizer dlinfo
    pip download --no-deps -d /tmp/dl torchaudio==2.11.0   # only three pure-Python files are used
    .venv/bin/python tools/record_parity_vectors.py --official /tmp/flexicodec_official \\
        --torchaudio-wheel /tmp/dl/torchaudio-2.11.0-*.whl [--official-git DIR] [--verify-shared ../shared/reference]

What is not the official stack, and why it cannot change a value:

- torchaudio: its C extension does not load with torch 2.13, so ``torchaudio`` is a package made of the wheel's
  pure-Python ``compliance/kaldi.py``, ``functional/functional.py`` and ``functional/filtering.py``, copied
  byte for byte (sha256 in the manifest); the official code calls only ``compliance.kaldi.fbank`` and
  ``functional.resample`` from it, which are pure torch.
- ``audiotools`` (``AudioSignal``, ``ml.BaseModel`` = ``nn.Module``) and ``cached_path`` are stubs: the DAC
  model only inherits save/load helpers from ``BaseModel``, and ``cached_path`` only resolves a download URL.
- The frozen models a wrapper loads in its constructor are not built: ``FlexiCodec``'s SenseVoice teacher
  (``funasr.AutoModel``) is a one-parameter stub (its features are an input here), and the codec inside the
  AR/NAR wrappers (``flexicodec.infer.prepare_model``) is an empty module; the Voicebox training case replaces
  ``_extract_dualcodec_features`` with the recorded codes/features, as ``../shared/reference/voicebox_tiny`` did.

Weights are random: the constructor's initialisation under ``torch.manual_seed(seed)``, then
``p += 0.05 * randn(p.shape, generator=Generator().manual_seed(seed + 1))`` over ``sorted(named_parameters())``
(the Voicebox adaptive RMSNorm biases are set to 1 first, as ``../shared/reference/voicebox_tiny`` does:
the HF ``post_init`` zeroes them, which would make every normalised activation 0). Sizes are reduced so that
the whole set stays under 5 MB; every code path of the released configuration is still exercised.

Beside each output the script stores how large float32 rounding is for that computation on these inputs:
``fp64_dev`` = max |float32 output - float64 rerun of the same official code| (and, for log features, the same
in the amplitude domain the tests compare in), and for integer outputs the evidence that the decisions are
not on a knife edge (codes unchanged under input perturbations 100x larger than float32 rounding; greedy
logit margins). ``tests/test_parity_bundled.py`` derives its tolerances from these numbers.

``--verify-shared DIR`` reruns the same call sequences on the inputs and weights of ``../shared/reference``
and compares them with the outputs stored there: evidence that this script calls the official code the way
those (fuller) references did.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
OUT_DEFAULT = REPO / "tests" / "data" / "parity"
OFFICIAL = {"package": "flexicodec", "version": "0.1.2", "repo": "AmphionTeam/FlexiCodec",
            "commit": "f52415cc043cf8bd6bcd65921edb8bb4241cf54a"}
SEED = 1234
TORCHAUDIO_FILES = ("torchaudio/compliance/kaldi.py", "torchaudio/functional/functional.py",
                    "torchaudio/functional/filtering.py")
NOISE_REL = 1e-5  # input perturbation for the decision-stability check (float32 rounding is ~6e-8 relative)


# ----------------------------------------------------------------------------------------------------------------
# Environment: the official package, the torchaudio files, stubs
# ----------------------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def build_torchaudio_shim(wheel: Path, dest: Path) -> dict:
    """A ``torchaudio`` package holding only the wheel's pure-Python kaldi/functional files (verbatim)."""
    info = {"wheel": wheel.name, "wheel_sha256": sha256(wheel), "files": {}}
    with zipfile.ZipFile(wheel) as zf:
        for name in TORCHAUDIO_FILES:
            data = zf.read(name)
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            info["files"][name] = hashlib.sha256(data).hexdigest()
        version = zf.read("torchaudio/version.py").decode().split("__version__ = ")[1].split("\n")[0].strip("'\"")
    info["version"] = version
    (dest / "torchaudio" / "__init__.py").write_text(
        f"__version__ = {version!r}  # pure-Python subset (record_parity_vectors.py)\n"
        "from . import compliance, functional  # noqa: F401\n")
    (dest / "torchaudio" / "_extension.py").write_text("_IS_TORCHAUDIO_EXT_AVAILABLE = False\n")
    (dest / "torchaudio" / "compliance" / "__init__.py").write_text("from . import kaldi  # noqa: F401\n")
    (dest / "torchaudio" / "functional" / "__init__.py").write_text(
        "from . import filtering, functional  # noqa: F401\n"
        "from .functional import create_dct, melscale_fbanks, pitch_shift, resample, spectrogram  # noqa: F401\n")
    return info


def install_stubs() -> None:
    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    module("audiotools", AudioSignal=object)
    module("audiotools.ml", BaseModel=nn.Module)
    module("cached_path", cached_path=lambda p: p)


class _StubTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))


class _StubAutoModel:
    def __init__(self, *args, **kwargs):
        self.model = _StubTeacher()


def setup_official(official: Path, torchaudio_wheel: Path, work: Path, official_git: Path | None) -> dict:
    shim = work / "torchaudio_shim"
    ta = build_torchaudio_shim(torchaudio_wheel, shim)
    sys.path[:0] = [str(shim), str(official)]
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded: a wrapper that tries fails loudly
    install_stubs()
    import importlib.metadata as md

    dist = md.distribution("flexicodec")
    if dist.version != OFFICIAL["version"] or not str(dist.locate_file("")).startswith(str(official)):
        raise SystemExit(f"expected flexicodec {OFFICIAL['version']} from {official}, found {dist.version} at "
                         f"{dist.locate_file('')}")
    pkg = official / "flexicodec"
    files = {str(p.relative_to(official)): p for p in sorted(pkg.rglob("*")) if p.is_file()
             and "__pycache__" not in p.parts}
    info = {**OFFICIAL, "installed_from": "pip install --no-deps flexicodec==0.1.2 (package index)",
            "file_sha256": {k: sha256(p) for k, p in files.items()}, "torchaudio_subset": ta}
    if official_git is not None:
        mismatched = []
        for rel, p in files.items():
            out = subprocess.run(["git", "-C", str(official_git), "ls-tree", OFFICIAL["commit"], "--", rel],
                                 capture_output=True, text=True, check=True).stdout.split()
            if len(out) < 3 or out[2] != git_blob_sha1(p.read_bytes()):
                mismatched.append(rel)
        if mismatched:
            raise SystemExit(f"wheel files differ from {OFFICIAL['repo']}@{OFFICIAL['commit']}: {mismatched}")
        info["git_check"] = f"all {len(files)} files equal the git blobs of {OFFICIAL['commit']}"
    vers = {}
    for name in ("torch", "numpy", "transformers", "funasr", "librosa", "scipy", "openai-whisper", "tiktoken",
                 "phonemizer"):
        try:
            vers[name] = md.version(name)
        except md.PackageNotFoundError:
            vers[name] = None
    info["versions"] = vers
    try:
        vers["espeak-ng"] = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.split(
            "text-to-speech:")[1].split()[0]
    except Exception:  # noqa: BLE001
        vers["espeak-ng"] = None
    return info


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def randomize(model: nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            p.add_(scale * torch.randn(p.shape, generator=g))


@contextlib.contextmanager
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def as64(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    if isinstance(x, dict):
        return {k: as64(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(as64(v) for v in x)
    return x


def maxabs(t: torch.Tensor) -> float:
    return float(t.detach().double().abs().max()) if t.numel() else 0.0


def dev(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise RuntimeError(f"fp64 rerun changed a shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def amp_dev(a_log: torch.Tensor, b_log: torch.Tensor, power: int, floor: float) -> float:
    """The log-feature error the tests use: max over frames of |exp(a/p) - exp(b/p)| / max(peak amplitude of
    the frame, amplitude of the floor), with bins on the last axis (frames = all other axes)."""
    a = torch.exp(a_log.double() / power)
    b = torch.exp(b_log.double() / power)
    peak = b.amax(-1, keepdim=True).clamp(min=math.exp(math.log(floor) / power))
    return float(((a - b).abs() / peak).max())


def describe(t: torch.Tensor, meaning: str, **extra) -> dict:
    d = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "meaning": meaning}
    if t.is_floating_point() and t.numel():
        d["absmax"] = maxabs(t)
    d.update(extra)
    return d


def contiguous(tensors: dict) -> dict:
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}


def save_component(out: Path, name: str, state: dict | None, io_tensors: dict, cases: dict,
                   state_name: str = "state_dict.safetensors", io_name: str = "io.safetensors",
                   cases_name: str = "cases.json") -> None:
    from safetensors.torch import save_file

    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    if state is not None:
        save_file(contiguous(state), str(d / state_name))
    save_file(contiguous(io_tensors), str(d / io_name))
    (d / cases_name).write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")


def espeak(text: str, rate: int = 22050) -> torch.Tensor:
    """espeak-ng en-us speech as float32 in [-1, 1) at 22050 Hz (int16 / 32768)."""
    import soundfile as sf

    wav = subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", text], capture_output=True, check=True).stdout
    data, sr = sf.read(io.BytesIO(wav), dtype="int16")
    if sr != rate:
        raise RuntimeError(f"espeak-ng gave {sr} Hz, expected {rate}")
    return torch.from_numpy(data.astype(np.float32) / 32768.0)


def official_resample(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    import torchaudio

    return torchaudio.functional.resample(x, orig, new)


# ----------------------------------------------------------------------------------------------------------------
# Codec (flexicodec/modeling_flexicodec.py FlexiCodec)
# ----------------------------------------------------------------------------------------------------------------
CODEC_CONFIG = {  # constructor kwargs; released dims reduced (see the README); every code path kept
    "sample_rate": 16000, "encoder_dim": 1, "encoder_rates": [4, 4, 5, 8, 2], "decoder_rates": [2, 8, 5, 4, 4],
    "latent_dim": 32, "decoder_dim": 32, "n_codebooks": 3, "quantizer_dropout": 1.0, "codebook_size": 16,
    "semantic_codebook_size": 32768, "is_causal": False, "use_similarity_alignment": True,
    "similarity_threshold": 0.91, "semantic_downsample_factor": 1.33333, "skip_normalize": True,
    "semantic_model_type": "sensevoice", "ssl_dim": 512, "use_bottleneck_transformer": True,
    "transformer_num_layers": 2, "transformer_dim": 16, "transformer_dim_feedforward": 32,
    "transformer_num_heads": 2, "transformer_causal": False, "transformer_context_frames": 6,
    "max_tokens_per_group": 3, "use_query_token_aggregator": True, "use_dynamic_similarity_threshold": True,
    "similarity_threshold_lower": 0.8, "similarity_threshold_upper": 1.0, "convnext_dim": 4, "convnext_layers": 1,
    "agg_transformer_num_layers": 1, "agg_transformer_dim": 16, "agg_transformer_num_heads": 2,
    "agg_transformer_dim_feedforward": 32,
}
CODEC_FRAMES = 14            # 80 ms frames: audio N = 1280 * 14, teacher frames T_sem = 19 -> int(19 / 1.33333) = 14
CODEC_CASES = [("t1.0_qall", 1.0, None), ("t0.91_q2", 0.91, 2), ("t0.8_q1", 0.8, 1)]


def build_official_codec(config: dict, state: dict | None = None, seed: int = SEED):
    import flexicodec.modeling_flexicodec as mf

    mf.AutoModel = _StubAutoModel  # the SenseVoice teacher is not run: its features are inputs
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        model = mf.FlexiCodec(**config, semantic_model_path="unused")
    if state is None:
        randomize(model, seed)
        model.semantic_model.dummy.data.zero_()
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith("semantic_model.")]
        if bad or unexpected:
            raise RuntimeError(f"official codec keys differ: missing {bad[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def codec_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("semantic_model.")}


def run_codec_case(model, audio, semantic, threshold, nq, capture=None):
    """What each case runs (as ../shared/reference/flexicodec_tiny): encode with the teacher features given,
    then decode from the codes."""
    if capture is not None:
        orig = model._perform_similarity_alignment_vectorized

        def spy(h, x_lens=None):
            capture.append(h.detach().clone())
            return orig(h, x_lens)
        model._perform_similarity_alignment_vectorized = spy
    try:
        with torch.no_grad():
            enc = model.forward_features(audio, 16000, n_quantizers=nq, semantic_repr=semantic,
                                         alignment_hidden=semantic, encode_only=True, manual_threshold=threshold)
            out = model.decode_from_codes(enc.semantic_codes, enc.acoustic_codes, enc.token_lengths)
    finally:
        if capture is not None:
            del model._perform_similarity_alignment_vectorized
    return enc, out


def codec_inputs(seed: int):
    """16 kHz espeak-ng speech and synthetic teacher features whose neighbour similarity is controlled: an AR(1)
    sequence whose correlation varies per frame, with a run of 9 frames at correlation 0.995 (merged at tau 0.91
    and 0.8, so the max-tokens cap of 3 splits it), and nothing within 1e-3 of a threshold after the official
    1.33333 interpolation (checked by the caller)."""
    speech = official_resample(espeak("Hello there."), 22050, 16000)
    n = 1280 * CODEC_FRAMES
    audio = torch.zeros(1, 1, n)
    seg = speech[: n]
    audio[0, 0, : seg.numel()] = seg
    g = torch.Generator().manual_seed(seed)
    t_sem = 19
    rho = torch.rand(t_sem, generator=g) * 0.35 + 0.6
    rho[5:14] = 0.995
    noise = torch.randn(512, t_sem, generator=g)
    frames = [noise[:, 0]]
    for t in range(1, t_sem):
        frames.append(rho[t] * frames[-1] + math.sqrt(1 - float(rho[t]) ** 2) * noise[:, t])
    semantic = torch.stack(frames, 1)[None].contiguous()
    return audio, semantic


def record_codec(out: Path, log) -> dict:
    seed = SEED
    for attempt in range(50):
        audio, semantic = codec_inputs(seed + attempt)
        model = build_official_codec(CODEC_CONFIG)
        ok, margins, results = True, {}, {}
        for key, tau, nq in CODEC_CASES:
            h = []
            enc, wav = run_codec_case(model, audio, semantic, tau, nq, capture=h)
            hv = h[0].double()[0]
            sim = torch.nn.functional.cosine_similarity(hv[:-1], hv[1:], dim=1)
            margins[key] = float((sim - tau).abs().min())
            results[key] = (enc, wav, sim)
            ok &= margins[key] >= 1e-3
        if ok:
            break
        log(f"codec: input seed {seed + attempt} has a similarity within 1e-3 of a threshold; next seed")
    else:
        raise RuntimeError("no codec input with clear merge decisions")
    input_seed = seed + attempt
    io_t = {"audio_0": audio, "semantic_0": semantic}
    cases, tensors = [], {"audio_0": describe(audio, "[B,1,N] 16 kHz input audio (espeak-ng 'Hello there.', "
                                                     "official torchaudio resample 22050->16000, zero-padded)"),
                          "semantic_0": describe(semantic, "[B,512,T_sem] teacher features (synthetic AR(1))")}
    model64 = copy.deepcopy(model).double()
    for key, tau, nq in CODEC_CASES:
        enc, wav, sim = results[key]
        tl = enc.token_lengths
        # the cap is active: without it this case merges into fewer tokens
        model.max_tokens_per_group = None
        enc_nocap, _ = run_codec_case(model, audio, semantic, tau, nq)
        model.max_tokens_per_group = CODEC_CONFIG["max_tokens_per_group"]
        # decision stability: identical codes under 8 input perturbations of relative size 1e-5
        g = torch.Generator().manual_seed(99)
        stable = True
        for _ in range(8):
            a = audio * (1 + NOISE_REL * torch.randn(audio.shape, generator=g))
            s = semantic * (1 + NOISE_REL * torch.randn(semantic.shape, generator=g))
            e2, _ = run_codec_case(model, a, s, tau, nq)
            stable &= torch.equal(e2.semantic_codes, enc.semantic_codes) and torch.equal(
                e2.token_lengths, enc.token_lengths) and (
                (e2.acoustic_codes is None and enc.acoustic_codes is None) or torch.equal(
                    e2.acoustic_codes, enc.acoustic_codes))
        if not stable:
            raise RuntimeError(f"codec case {key}: codes change under 1e-5 input perturbations")
        with float64(), torch.no_grad():
            wav64 = model64.decode_from_codes(enc.semantic_codes, enc.acoustic_codes, enc.token_lengths)
            enc64 = model64.forward_features(as64(audio), 16000, n_quantizers=nq, semantic_repr=as64(semantic),
                                             alignment_hidden=as64(semantic), encode_only=True, manual_threshold=tau)
        same64 = torch.equal(enc64.semantic_codes, enc.semantic_codes) and torch.equal(
            enc64.token_lengths, enc.token_lengths)
        io_t[f"{key}_semantic_codes"] = enc.semantic_codes
        io_t[f"{key}_token_lengths"] = tl
        tensors[f"{key}_semantic_codes"] = describe(enc.semantic_codes, "[B,1,G] FSQ codes")
        tensors[f"{key}_token_lengths"] = describe(tl, "[B,G] frames merged into each token")
        if enc.acoustic_codes is not None:
            io_t[f"{key}_acoustic_codes"] = enc.acoustic_codes
            tensors[f"{key}_acoustic_codes"] = describe(enc.acoustic_codes, "[B,nq-1,G] RVQ codes")
        io_t[f"{key}_audio_out"] = wav
        tensors[f"{key}_audio_out"] = describe(wav, "[B,1,1280*F-16] decode_from_codes(codes)",
                                               fp64_dev=dev(wav, wav64))
        cases.append({"key": key, "audio": "audio_0", "semantic": "semantic_0", "threshold": tau,
                      "num_quantizers": nq, "groups": int(tl.shape[-1]), "frames": int(tl.sum()),
                      "token_lengths": tl[0].tolist(), "groups_without_max_tokens_cap":
                      int(enc_nocap.token_lengths.shape[-1]),
                      "min_abs_similarity_minus_threshold": margins[key],
                      "codes_unchanged_under_1e-5_input_noise_x8": stable,
                      "fp64_rerun_same_codes": bool(same64)})
        log(f"codec {key}: G={tl.shape[-1]} (without cap {enc_nocap.token_lengths.shape[-1]}), "
            f"lengths {tl[0].tolist()}, sim margin {margins[key]:.2e}, fp64 dev audio {dev(wav, wav64):.2e}")
    merged = [c for c in cases if c["groups"] < c["frames"]]
    capped = [c for c in cases if c["groups_without_max_tokens_cap"] < c["groups"]]
    assert merged and capped, "need a merged case and a case where the max-tokens cap splits a run"
    spec = {"official": OFFICIAL, "call": "model.forward_features(audio, 16000, n_quantizers=nq, semantic_repr=sem, "
            "alignment_hidden=sem, encode_only=True, manual_threshold=tau); model.decode_from_codes("
            "enc.semantic_codes, enc.acoustic_codes, enc.token_lengths); model.eval(), torch.no_grad(), float32, "
            "1 thread",
            "config": CODEC_CONFIG, "seed": SEED, "input_seed": input_seed,
            "weights": "torch.manual_seed(seed); FlexiCodec(**config); p += 0.05*randn (Generator seed+1, sorted "
                       "names); teacher stubbed (semantic_model.* not stored)",
            "cases": cases, "tensors": tensors}
    save_component(out, "codec", codec_state(model), io_t, spec, state_name="official_state_dict.safetensors",
                   io_name="reference_io.safetensors", cases_name="reference_cases.json")
    return spec


def verify_codec(shared: Path, log) -> dict:
    from safetensors.torch import load_file

    d = shared / "flexicodec_tiny"
    spec = json.loads((d / "reference_cases.json").read_text())
    model = build_official_codec(spec["config"], load_file(str(d / "official_state_dict.safetensors")))
    io_t = load_file(str(d / "reference_io.safetensors"))
    worst, codes_ok = 0.0, True
    for case in spec["cases"]:
        enc, wav = run_codec_case(model, io_t[case["audio"]], io_t[case["semantic"]], case["threshold"],
                                  case["num_quantizers"])
        k = case["key"]
        codes_ok &= torch.equal(enc.semantic_codes, io_t[f"{k}_semantic_codes"])
        codes_ok &= torch.equal(enc.token_lengths, io_t[f"{k}_token_lengths"])
        if f"{k}_acoustic_codes" in io_t:
            codes_ok &= torch.equal(enc.acoustic_codes, io_t[f"{k}_acoustic_codes"])
        worst = max(worst, dev(wav, io_t[f"{k}_audio_out"]))
    log(f"verify codec: {len(spec['cases'])} cases, codes identical {codes_ok}, max |Δaudio| {worst:.3g}")
    return {"cases": len(spec["cases"]), "codes_identical": bool(codes_ok), "max_abs_audio_diff": worst}


# ----------------------------------------------------------------------------------------------------------------
# SenseVoice front end + encoder (flexicodec/feature_extractors.py FBankGen, customized_sensevoice/model.py,
# modeling_flexicodec._extract_semantic_code as FlexiCodec.forward calls it)
# ----------------------------------------------------------------------------------------------------------------
SV_ENCODER_CONF = {"output_size": 32, "attention_heads": 4, "linear_units": 64, "num_blocks": 2, "tp_blocks": 0,
                   "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "attention_dropout_rate": 0.1,
                   "input_layer": "pe", "pos_enc_class": "SinusoidalPositionEncoder", "normalize_before": True,
                   "kernel_size": 11, "sanm_shfit": 0, "selfattention_layer_type": "sanm"}
SV_VOCAB = 32
SV_FRONTEND = {"fs": 16000, "window": "hamming", "n_mels": 80, "frame_length": 25, "frame_shift": 10,
               "lfr_m": 7, "lfr_n": 6}
FBANK_FLOOR = float(torch.finfo(torch.float32).eps)  # kaldi floors mel energies at float32 eps before the log


def build_official_sensevoice(encoder_conf: dict, vocab: int, state: dict | None = None, seed: int = SEED):
    from flexicodec.customized_sensevoice import model as sv

    torch.manual_seed(seed)
    model = sv.SenseVoiceSmall(encoder="SenseVoiceEncoderSmall", encoder_conf=dict(encoder_conf), input_size=560,
                               vocab_size=vocab)
    if type(model.encoder) is not sv.SenseVoiceEncoderSmall:
        raise RuntimeError(f"encoder class is {type(model.encoder)}, not FlexiCodec's customized one")
    if state is None:
        randomize(model, seed)
    else:
        model.load_state_dict(state, strict=True)
    return model.eval()


def official_fbank_gen():
    import funasr.utils.fbank as ffb
    from flexicodec.feature_extractors import FBankGen

    if not ffb._HAS_TORCHAUDIO:
        raise RuntimeError("funasr does not see torchaudio.compliance.kaldi (it would use kaldi-native-fbank)")
    gen = FBankGen(sr=16000)
    gen.frontend.dither = 0.0  # the official default 1.0 adds noise: not reproducible
    return gen


def run_sensevoice(model, gen, wav: torch.Tensor):
    """wav [1, N] -> (fbank [1,F,80], lfr_cmvn [1,T,560], semantic [1,C,T]) exactly as FlexiCodec computes them."""
    import funasr.utils.fbank as ffb
    from flexicodec.modeling_flexicodec import _extract_semantic_code

    captured = []
    orig = ffb.fbank

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        captured.append(out.detach().clone())
        return out
    ffb.fbank = spy
    try:
        feats, _ = gen.extract_fbank(wav.clone())
    finally:
        ffb.fbank = orig
    with torch.no_grad():
        sem = _extract_semantic_code(model, feats.clone(), torch.ones(feats.shape[:2]), torch.zeros(1), torch.ones(1),
                                     skip_normalize=True, sensevoice_prepend_inputs=True, sim_layer_idx=None,
                                     semantic_layer_idx=None)[0].transpose(1, 2)
    return captured[0][None], feats, sem


def lfr_cmvn64(fb: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 statement of funasr apply_lfr (m7, n6) + apply_cmvn, only to measure float32 rounding."""
    f = fb.shape[0]
    t = math.ceil(f / 6)
    idx = (6 * torch.arange(t)[:, None] - 3 + torch.arange(7)[None]).clamp(0, f - 1)
    return (fb.double()[idx].reshape(t, -1) + shift.double()) * scale.double()


def sensevoice_items() -> list[tuple[str, torch.Tensor]]:
    speech = official_resample(espeak("Hello."), 22050, 16000)
    noise = torch.from_numpy(np.random.default_rng(SEED).standard_normal(4001).astype(np.float32) * 0.1)
    tone = torch.sin(2 * math.pi * 440 * torch.arange(350) / 16000) * 0.3
    return [("espeak-ng en-us 'Hello.' (22050 Hz, official resample to 16 kHz; digital silence at both ends)",
             speech), ("white noise, std 0.1, numpy default_rng(1234)", noise),
            ("440 Hz sine, 350 samples: shorter than one 25 ms frame (frame_length shrinks)", tone)]


def record_sensevoice(out: Path, log) -> dict:
    from flexicodec.modeling_flexicodec import _extract_semantic_code
    from funasr.frontends.wav_frontend import load_cmvn

    model = build_official_sensevoice(SV_ENCODER_CONF, SV_VOCAB)
    gen = official_fbank_gen()
    am_mvn = Path(sys.modules["flexicodec.feature_extractors"].__file__).parent / "am.mvn"
    cmvn = torch.as_tensor(load_cmvn(str(am_mvn)))
    model64 = copy.deepcopy(model).double()
    io_t, tensors, items = {}, {}, []
    for i, (kind, wav) in enumerate(sensevoice_items()):
        wav = wav[None].float().contiguous()
        fb, lfr, sem = run_sensevoice(model, gen, wav)
        # float64 reruns: kaldi.fbank on the float64 waveform, LFR/CMVN in float64, the encoder in float64
        import torchaudio

        n = wav.shape[1]
        fb64 = torchaudio.compliance.kaldi.fbank(
            wav.double() * 32768, num_mel_bins=80, frame_length=min(25, n / 16000 * 1000), frame_shift=10,
            dither=0.0, energy_floor=0.0, window_type="hamming", sample_frequency=16000, snip_edges=True)
        lfr64 = lfr_cmvn64(fb64, cmvn[0], cmvn[1])
        with float64(), torch.no_grad():
            sem64_from_lfr = _extract_semantic_code(model64, lfr.double(), torch.ones(lfr.shape[:2]), torch.zeros(1),
                                                    torch.ones(1), skip_normalize=True)[0].transpose(1, 2)
            sem64_e2e = _extract_semantic_code(model64, lfr64[None], torch.ones(lfr.shape[:2]), torch.zeros(1),
                                               torch.ones(1), skip_normalize=True)[0].transpose(1, 2)
        silent = int((fb[0] <= math.log(FBANK_FLOOR) + 1e-3).all(-1).sum())
        io_t.update({f"wav_{i}": wav, f"fbank_{i}": fb, f"lfr_cmvn_{i}": lfr, f"semantic_{i}": sem})
        tensors[f"wav_{i}"] = describe(wav, f"[1,N] 16 kHz input in [-1,1]: {kind}")
        tensors[f"fbank_{i}"] = describe(fb, "[1,F,80] kaldi.fbank(wav*32768) inside WavFrontend (dither 0)",
                                         fp64_dev=dev(fb[0], fb64), amp_dev=amp_dev(fb[0], fb64, 2, FBANK_FLOOR),
                                         frames_at_floor=silent)
        tensors[f"lfr_cmvn_{i}"] = describe(lfr, "[1,T,560] FBankGen.extract_fbank (LFR m7 n6, CMVN am.mvn)",
                                            fp64_dev=dev(lfr[0], lfr64))
        tensors[f"semantic_{i}"] = describe(sem, "[1,C,T] _extract_semantic_code(...)[0].transpose(1,2)",
                                            fp64_dev_from_lfr_cmvn=dev(sem, sem64_from_lfr),
                                            fp64_dev_end_to_end=dev(sem, sem64_e2e))
        items.append({"kind": kind, "num_samples": n, "fbank_frames": fb.shape[1], "T_lfr": lfr.shape[1],
                      "frames_at_floor": silent})
        log(f"sensevoice item {i}: N={n} F={fb.shape[1]} T={lfr.shape[1]} floor frames {silent}; fp64 dev fbank "
            f"{dev(fb[0], fb64):.2e} (amplitude {amp_dev(fb[0], fb64, 2, FBANK_FLOOR):.2e}), lfr "
            f"{dev(lfr[0], lfr64):.2e}, semantic {dev(sem, sem64_from_lfr):.2e} / e2e {dev(sem, sem64_e2e):.2e}")
    spec = {"official": OFFICIAL, "encoder_conf": SV_ENCODER_CONF, "vocab_size": SV_VOCAB, "input_size": 560,
            "frontend_conf": SV_FRONTEND, "dither": 0.0, "seed": SEED,
            "weights": "torch.manual_seed(seed); SenseVoiceSmall(encoder='SenseVoiceEncoderSmall', ...); "
                       "p += 0.05*randn (Generator seed+1, sorted names)",
            "call": "FBankGen(sr=16000) with frontend.dither = 0 -> extract_fbank(wav[1,N]); _extract_semantic_code("
                    "model, feats, ones, zeros(1), ones(1), skip_normalize=True, sensevoice_prepend_inputs=True, "
                    "sim_layer_idx=None, semantic_layer_idx=None)[0].transpose(1,2); fbank captured at "
                    "funasr.utils.fbank.fbank (-> torchaudio.compliance.kaldi.fbank)",
            "am_mvn_sha256": sha256(am_mvn), "items": items, "tensors": tensors}
    save_component(out, "sensevoice", model.state_dict(), io_t, spec)
    shutil.copy(am_mvn, out / "sensevoice" / "am.mvn")
    return spec


def verify_sensevoice(shared: Path, log) -> dict:
    from safetensors.torch import load_file

    d = shared / "sensevoice_tiny"
    spec = json.loads((d / "reference_cases.json").read_text())
    model = build_official_sensevoice(spec["model"]["encoder_conf"], spec["model"]["vocab_size"],
                                      load_file(str(d / "state_dict.safetensors")))
    gen = official_fbank_gen()
    io_t = load_file(str(d / "reference_io.safetensors"))
    res = {"fbank": 0.0, "lfr_cmvn": 0.0, "semantic": 0.0}
    for i in range(len(spec["items"])):
        fb, lfr, sem = run_sensevoice(model, gen, io_t[f"wav_{i}"])
        res["fbank"] = max(res["fbank"], dev(fb, io_t[f"fbank_{i}"]))
        res["lfr_cmvn"] = max(res["lfr_cmvn"], dev(lfr, io_t[f"lfr_cmvn_{i}"]))
        res["semantic"] = max(res["semantic"], dev(sem, io_t[f"semantic_{i}"]))
    log(f"verify sensevoice: {len(spec['items'])} items, max |Δ| {res}")
    return res


# ----------------------------------------------------------------------------------------------------------------
# AR TTS (flexicodec/ar_tts/modeling_artts.py TransformerLMWrapper -> TransformerLM)
# ----------------------------------------------------------------------------------------------------------------
AR_CONFIG = {"text_encoder_input_size": 32, "text_encoder_output_size": 32, "text_encoder_num_blocks": 2,
             "llm_input_size": 32, "llm_output_size": 32, "llm_attention_heads": 2, "llm_num_blocks": 2,
             "llm_dropout_rate": 0.1, "llm_positional_dropout_rate": 0.1, "llm_attention_dropout_rate": 0.0,
             "text_token_size": 512, "speech_token_size": 256, "spk_embed_dim": 8, "duration_classes": 10,
             "use_duration_conditioning": True, "flex_framerate": True, "flex_framerate_options": [0.86, 0.91],
             "text_encoder_attention_heads": 2, "text_encoder_linear_units": 48, "llm_linear_units": 80}
AR_TEXTS = ["hello world, this is a test.", "The quick brown fox jumps over the lazy dog."]


@contextlib.contextmanager
def stub_codec_in_wrappers():
    """TransformerLMWrapper / VoiceboxWrapper build the frozen codec in their constructor: an empty module."""
    import flexicodec.infer as infer
    import flexicodec.nar_tts.modeling_voicebox as mv  # binds prepare_model at import

    orig = infer.prepare_model, mv.prepare_model
    infer.prepare_model = mv.prepare_model = lambda *a, **k: {"model": nn.Module()}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        infer.prepare_model, mv.prepare_model = orig


def build_official_ar(config: dict, state: dict | None = None, seed: int = SEED):
    from flexicodec.ar_tts.modeling_artts import TransformerLMWrapper

    torch.manual_seed(seed)
    with stub_codec_in_wrappers():
        wrapper = TransformerLMWrapper(**config)
    if state is None:
        randomize(wrapper, seed)
    else:
        wrapper.load_state_dict(state, strict=True)
    return wrapper.eval()


class Hooks:
    """Forward hooks that keep (inputs, output) of modules, detached and cloned."""

    def __init__(self, **modules):
        self.calls = {k: [] for k in modules}
        self.handles = [m.register_forward_hook(self._hook(k)) for k, m in modules.items()]

    def _hook(self, key):
        def hook(_, args, out):
            with torch.inference_mode(False):
                self.calls[key].append(([a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args],
                                        (out[0] if isinstance(out, tuple) else out).detach().clone()))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def plain(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor from a possibly inference-mode one."""
    with torch.inference_mode(False):
        return torch.tensor(t.tolist(), dtype=t.dtype) if t.dim() == 0 else t.clone()


def ar_teacher_forcing(wrapper, batch: dict, fr: float):
    lm = wrapper.transformer_lm
    hooks = Hooks(llm=lm.llm, text_encoder=lm.text_encoder, llm_decoder=lm.llm_decoder,
                  duration_decoder=lm.duration_decoder)
    try:
        with torch.no_grad():
            total, metrics = lm({**{k: v.clone() for k, v in batch.items()}, "embedding": None,
                                 "selected_framerate": fr}, "cpu")
    finally:
        hooks.remove()
    (llm_args, lm_output), = hooks.calls["llm"]
    return {"lm_input": llm_args[0], "lm_input_len": llm_args[1], "lm_output": lm_output,
            "text_encoder_out": hooks.calls["text_encoder"][0][1], "logits": hooks.calls["llm_decoder"][0][1],
            "duration_logits": hooks.calls["duration_decoder"][0][1], "total_loss": total.detach(),
            "loss": metrics["loss"], "acc": metrics["acc"], "duration_loss": metrics["duration_loss"]}


def ar_greedy(wrapper, case: dict):
    lm = wrapper.transformer_lm
    hooks = Hooks(llm_decoder=lm.llm_decoder, duration_decoder=lm.duration_decoder)
    prefix = []
    orig = lm.llm.forward_chunk

    def spy(xs, *args, **kwargs):
        out = orig(xs, *args, **kwargs)
        if not prefix:
            with torch.inference_mode(False):
                prefix.append((xs.clone(), out[0].clone()))
        return out
    lm.llm.forward_chunk = spy
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            res = wrapper.inference(case["text"].clone(), case["text_len"].clone(), case["prompt_text"].clone(),
                                    case["prompt_text_len"].clone(), case["prompt_speech_token"].clone(),
                                    case["prompt_speech_token_len"].clone(), embedding=None,
                                    prompt_token_lengths=case["prompt_token_lengths"].clone(), beam_size=1, top_k=1,
                                    temperature=1.0, max_token_text_ratio=2.0, min_token_text_ratio=0.0,
                                    predict_duration=True, duration_temperature=1.0, duration_top_k=1,
                                    inference_framerate=case["framerate"])
    finally:
        del lm.llm.forward_chunk
        hooks.remove()
    return {"speech_tokens": plain(res["speech_tokens"]), "duration_classes": plain(res["duration_classes"]),
            "step_logits": torch.cat([o for _, o in hooks.calls["llm_decoder"]]),
            "step_lm_output": torch.cat([a[0] for a, _ in hooks.calls["llm_decoder"]]),
            "step_duration_logits": torch.cat([o for _, o in hooks.calls["duration_decoder"]]),
            "prefix_lm_input": prefix[0][0], "prefix_lm_output": prefix[0][1]}


def top2_gap(logits: torch.Tensor) -> float:
    top = logits.double().topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


def record_ar(out: Path, log) -> dict:
    cfg = AR_CONFIG
    wrapper = build_official_ar(cfg)
    wrapper64 = copy.deepcopy(wrapper).double()
    g = torch.Generator().manual_seed(SEED + 7)
    tl, sl = torch.tensor([9, 6]), torch.tensor([14, 10])
    text = torch.randint(1, cfg["text_token_size"], (2, 9), generator=g) * (torch.arange(9) < tl[:, None])
    speech = torch.randint(0, cfg["speech_token_size"], (2, 14), generator=g) * (torch.arange(14) < sl[:, None])
    dur = torch.randint(1, 9, (2, 14), generator=g) * (torch.arange(14) < sl[:, None])
    batch = {"text_token": text, "text_token_len": tl, "speech_token": speech, "speech_token_len": sl, "duration": dur}
    io_t = {f"tf.{k}": v for k, v in batch.items()}
    tensors = {f"tf.{k}": describe(v, m) for (k, v), m in zip(batch.items(), [
        "text ids [B,L], 0-padded", "[B]", "speech tokens [B,T], 0-padded", "[B]", "durations [B,T] in 1..8"])}
    meaning = {"lm_input": "[B,N,D] input of lm.llm (padding rows = -1)", "lm_input_len": "[B] 3+L+T",
               "lm_output": "[B,N,D] lm.llm output (after after_norm)",
               "text_encoder_out": "[B,L,D] text encoder output (before the affine layer)",
               "logits": "[B,N,V+1] llm_decoder at every position",
               "duration_logits": "[sum T,10] duration head, item-major", "total_loss": "returned loss",
               "loss": "metrics['loss']", "acc": "metrics['acc']", "duration_loss": "metrics['duration_loss']"}
    for fr in cfg["flex_framerate_options"]:
        res = ar_teacher_forcing(wrapper, batch, fr)
        with float64():
            res64 = ar_teacher_forcing(wrapper64, batch, fr)
        for k, v in res.items():
            extra = {"fp64_dev": dev(v, res64[k])} if v.is_floating_point() else {}
            if k in ("lm_input", "lm_output", "logits"):  # padded rows of item 1 are garbage by design
                n1 = int(res["lm_input_len"][1])
                extra["fp64_dev_valid"] = max(dev(v[0], res64[k][0]), dev(v[1, :n1], res64[k][1, :n1]))
            io_t[f"tf.fr{fr}.{k}"] = v
            tensors[f"tf.fr{fr}.{k}"] = describe(v, meaning[k], **extra)
        log(f"ar tf fr{fr}: loss {float(res['total_loss']):.4f}, fp64 dev logits(valid) "
            f"{tensors[f'tf.fr{fr}.logits']['fp64_dev_valid']:.2e}, total_loss "
            f"{tensors[f'tf.fr{fr}.total_loss']['fp64_dev']:.2e}")
    inf = {"text": torch.randint(1, cfg["text_token_size"], (1, 5), generator=g), "text_len": torch.tensor([5]),
           "prompt_text": torch.randint(1, cfg["text_token_size"], (1, 4), generator=g),
           "prompt_text_len": torch.tensor([4]),
           "prompt_speech_token": torch.randint(0, cfg["speech_token_size"], (1, 6), generator=g),
           "prompt_speech_token_len": torch.tensor([6]),
           "prompt_token_lengths": torch.randint(1, 9, (1, 6), generator=g), "framerate": 0.86}
    res = ar_greedy(wrapper, inf)
    with float64():
        res64 = ar_greedy(wrapper64, inf)
    same64 = torch.equal(res["speech_tokens"], res64["speech_tokens"]) and torch.equal(
        res["duration_classes"], res64["duration_classes"])
    for k, v in inf.items():
        if k != "framerate":
            io_t[f"inf.{k}"] = v
            tensors[f"inf.{k}"] = describe(v, "decoding input")
    for k, v in res.items():
        io_t[f"inf.{k}"] = v
        extra = {"fp64_dev": dev(v, res64[k])} if v.is_floating_point() and same64 else {}
        tensors[f"inf.{k}"] = describe(v, {"speech_tokens": "[1,S] greedy tokens",
                                           "duration_classes": "[1,S-1] greedy durations (length cap: one short)",
                                           "step_logits": "[S,V+1] llm_decoder per step",
                                           "step_lm_output": "[S,D] last hidden per step",
                                           "step_duration_logits": "[S-1,10] duration head per step",
                                           "prefix_lm_input": "[1,P,D] first forward_chunk input",
                                           "prefix_lm_output": "[1,P,D] first forward_chunk output"}[k], **extra)
    margins = {"min_top1_top2_token_logit_gap": top2_gap(res["step_logits"]),
               "min_top1_top2_duration_logit_gap": top2_gap(res["step_duration_logits"]),
               "fp64_rerun_same_tokens_and_durations": bool(same64)}
    log(f"ar greedy: tokens {res['speech_tokens'].tolist()} durations {res['duration_classes'].tolist()} {margins}")
    frontend = {}
    from flexicodec.ar_tts.utils import g2p_phonemizer, whisper_tokenize

    for text in AR_TEXTS:
        frontend[text] = {"text2idx(g2p_prob=0)": whisper_tokenize.text2idx(text, "en", g2p_prob=0.0),
                          "g2p_phonemizer_en": g2p_phonemizer.g2p_phonemizer_en(text),
                          "text2idx(g2p_prob=1)": whisper_tokenize.text2idx(text, "en", g2p_prob=1.0)}
    spec = {"official": OFFICIAL, "config": cfg, "seed": SEED,
            "weights": "torch.manual_seed(seed); TransformerLMWrapper(**config) (codec stubbed: empty module); "
                       "p += 0.05*randn (Generator seed+1, sorted names)",
            "calls": {"tf": "wrapper.transformer_lm({text_token, text_token_len, speech_token, speech_token_len, "
                            "duration, embedding: None, selected_framerate: fr}, 'cpu'); intermediates by forward "
                            "hooks (llm, text_encoder, llm_decoder, duration_decoder)",
                      "inf": "wrapper.inference(text, text_len, prompt_text, prompt_text_len, prompt_speech_token, "
                             "prompt_speech_token_len, embedding=None, prompt_token_lengths, beam_size=1, top_k=1, "
                             "temperature=1.0, max_token_text_ratio=2.0, min_token_text_ratio=0.0, "
                             "predict_duration=True, duration_temperature=1.0, duration_top_k=1, "
                             "inference_framerate=0.86); per-step tensors by hooks on llm_decoder/duration_decoder, "
                             "prefix = first llm.forward_chunk call",
                      "text_frontend": "whisper_tokenize.text2idx(text, 'en', g2p_prob) and "
                                       "g2p_phonemizer.g2p_phonemizer_en(text) (phonemizer + espeak-ng)"},
            "inference": {"framerate": inf["framerate"], **margins}, "text_frontend": frontend, "tensors": tensors}
    state = {k: v for k, v in wrapper.state_dict().items()}
    save_component(out, "ar_tts", state, io_t, spec)
    return spec


def verify_ar(shared: Path, log) -> dict:
    from safetensors.torch import load_file

    d = shared / "ar_tts_tiny"
    spec = json.loads((d / "reference_cases.json").read_text())
    wrapper = build_official_ar(spec["config"], load_file(str(d / "state_dict.safetensors")))
    io_t = load_file(str(d / "reference_io.safetensors"))
    batch = {k: io_t[f"tf.{k}"] for k in ("text_token", "text_token_len", "speech_token", "speech_token_len",
                                          "duration")}
    worst = 0.0
    for fr in spec["config"]["flex_framerate_options"]:
        res = ar_teacher_forcing(wrapper, batch, fr)
        for k, v in res.items():
            if f"tf.fr{fr}.{k}" in io_t:
                worst = max(worst, dev(v.float(), io_t[f"tf.fr{fr}.{k}"].float()))
    inf = {k: io_t[f"inf.{k}"] for k in ("text", "prompt_text", "prompt_speech_token", "prompt_token_lengths")}
    inf.update(text_len=torch.tensor([inf["text"].shape[1]]),
               prompt_text_len=torch.tensor([inf["prompt_text"].shape[1]]),
               prompt_speech_token_len=torch.tensor([inf["prompt_speech_token"].shape[1]]), framerate=0.86)
    res = ar_greedy(wrapper, inf)
    same = torch.equal(res["speech_tokens"], io_t["inf.speech_tokens"]) and torch.equal(
        res["duration_classes"], io_t["inf.duration_classes"])
    for k in ("step_logits", "step_lm_output", "step_duration_logits", "prefix_lm_input", "prefix_lm_output"):
        worst = max(worst, dev(res[k], io_t[f"inf.{k}"]))
    fe = spec["text_frontend"]
    from flexicodec.ar_tts.utils import g2p_phonemizer, whisper_tokenize

    raw = fe["text2idx(g2p_prob=0)"]
    fe_ok = whisper_tokenize.text2idx(raw["text"], "en", 0.0) == raw["ids"]
    fe_ok &= g2p_phonemizer.g2p_phonemizer_en(fe["g2p_phonemizer_en"]["text"]) == fe["g2p_phonemizer_en"]["phonemes"]
    log(f"verify ar_tts: greedy tokens/durations identical {same}, text front end identical {fe_ok}, "
        f"max |Δ| over float outputs {worst:.3g}")
    return {"greedy_identical": bool(same), "text_frontend_identical": bool(fe_ok), "max_abs_diff": worst}


# ----------------------------------------------------------------------------------------------------------------
# Voicebox NAR (flexicodec/nar_tts/modeling_voicebox.py VoiceboxWrapper, voicebox_models.VoiceBox, llama_nar)
# ----------------------------------------------------------------------------------------------------------------
VB_CONFIG = {"mel_dim": 128, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "cfg_scale": 0.2,
             "use_cond_code": True, "cond_codebook_size": 256, "cond_scale_factor": 4, "cond_dim": 32,
             "sigma": 1e-05, "time_scheduler": "cos", "repa_layer_idx": 1}
VB_WRAPPER = {"ssl_feature_dim": 16, "repa_projection_dim": 16}


def build_official_voicebox(config: dict, wrapper_kwargs: dict, state: dict | None = None, seed: int = SEED):
    from flexicodec.nar_tts.llama_nar import LlamaAdaptiveRMSNorm
    from flexicodec.nar_tts.modeling_voicebox import VoiceboxWrapper

    torch.manual_seed(seed)
    with stub_codec_in_wrappers():
        wrapper = VoiceboxWrapper(voicebox_config=dict(config), **wrapper_kwargs)
    if state is None:
        with torch.no_grad():
            for m in wrapper.modules():
                if isinstance(m, LlamaAdaptiveRMSNorm):
                    m.to_weight.bias.fill_(1.0)
        randomize(wrapper, seed)
    else:
        wrapper.load_state_dict(state, strict=True)
    return wrapper.eval()


def vb_cond(vb, codes: torch.Tensor) -> torch.Tensor:
    """cond_emb(codes) nearest-upsampled x cond_scale_factor (as infer_voicebox_tts / VoiceBox.forward)."""
    return torch.nn.functional.interpolate(vb.cond_emb(codes).transpose(1, 2),
                                           scale_factor=vb.cond_scale_factor).transpose(1, 2)


def vb_estimator(vb, x_t, t, cond, x_mask):
    with torch.no_grad():
        v = vb.diff_estimator(x_t, t, cond, x_mask)
        v2, hidden = vb.diff_estimator.forward_with_hidden_features(x_t, t, cond, x_mask)
    if not torch.equal(v, v2):
        raise RuntimeError("forward and forward_with_hidden_features disagree")
    return v, hidden


@contextlib.contextmanager
def randn_spy(store: list, replace: torch.Tensor | None = None):
    """Record (or replace) the first torch.randn draw made inside the block."""
    orig = torch.randn

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        if not store:
            if replace is not None:
                out = replace.to(out.dtype).clone()
            store.append(out.detach().clone())
        return out
    torch.randn = spy
    try:
        yield
    finally:
        torch.randn = orig


def vb_reverse(vb, cond, prompt_mel, z=None):
    store = []
    with randn_spy(store, z), torch.no_grad():
        out = vb.reverse_diffusion(cond, prompt=prompt_mel, n_timesteps=4, cfg=2.0, rescale_cfg=0.75)
    return store[0], out


def vb_training(wrapper, audio, audio_lens, codes, repr_ret, seed):
    vb = wrapper.voicebox_model
    cap = {}
    orig_fd, orig_est, orig_mel = vb.forward_diffusion, vb.diff_estimator.forward_with_hidden_features, \
        wrapper._extract_mel_features

    def fd(x, t):
        xt, z, new_t, prompt_len, mask = orig_fd(x, t)
        cap.update(x_t=xt, z=z, t=new_t, prompt_len=prompt_len)
        return xt, z, new_t, prompt_len, mask

    def est(xt, t, cond, x_mask):
        flow, hidden = orig_est(xt, t, cond, x_mask)
        cap.update(cond_in=cond, x_mask=x_mask, flow_pred=flow, repa_hidden=hidden)
        return flow, hidden

    def mel(speech):
        m = orig_mel(speech)
        cap.update(mel=m)
        return m
    vb.forward_diffusion, vb.diff_estimator.forward_with_hidden_features = fd, est
    wrapper._extract_mel_features = mel
    wrapper._extract_dualcodec_features = lambda *a, **k: {"semantic_codes": codes, "speech_token_len": None,
                                                           "semantic_repr_ret": repr_ret}
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            loss, metrics = wrapper.training_forward({"audio": audio, "audio_lens": audio_lens, "x": None,
                                                      "x_lens": None})
    finally:
        del vb.forward_diffusion, vb.diff_estimator.forward_with_hidden_features, wrapper._extract_mel_features
        del wrapper._extract_dualcodec_features
    cap = {k: v.detach().clone() for k, v in cap.items()}
    cap.update(loss=loss.detach(), diff_loss=metrics["diff_loss"], repa_loss=metrics["repa_loss"])
    return cap


def record_voicebox(out: Path, log) -> dict:
    wrapper = build_official_voicebox(VB_CONFIG, VB_WRAPPER)
    vb = wrapper.voicebox_model
    vb64 = copy.deepcopy(vb).double()
    g = torch.Generator().manual_seed(SEED + 11)
    io_t, tensors = {}, {}

    def put(name, t, meaning, **extra):
        io_t[name] = t
        tensors[name] = describe(t, meaning, **extra)

    # 1. the velocity estimator
    codes = torch.randint(0, VB_CONFIG["cond_codebook_size"], (2, 6), generator=g)
    with torch.no_grad():
        cond = vb_cond(vb, codes)
    x_t = torch.randn(2, 24, 128, generator=g)
    t = torch.tensor([0.3, 0.85])
    x_mask = torch.ones(2, 24)
    x_mask[1, 20:] = 0
    v, hidden = vb_estimator(vb, x_t, t, cond, x_mask)
    with float64():
        v64, hidden64 = vb_estimator(vb64, x_t.double(), t.double(), cond.double(), x_mask.double())
    put("vf.cond_codes", codes, "[B,T/4] 12.5 Hz codes")
    put("vf.cond", cond, "[B,T,H] cond_emb(codes) nearest-upsampled x4")
    put("vf.x_t", x_t, "[B,T,128] noisy mel")
    put("vf.t", t, "[B] flow time")
    put("vf.x_mask", x_mask, "[B,T] 1 = valid (item 1: 20 frames)")
    put("vf.v", v, "[B,T,128] diff_estimator(x_t, t, cond, x_mask) (padded query rows included)", fp64_dev=dev(v, v64))
    put("vf.repa_hidden", hidden, "[B,T,H] forward_with_hidden_features: after layer repa_layer_idx",
        fp64_dev=dev(hidden, hidden64))
    # 2. the Euler sampler with classifier-free guidance, as infer_voicebox_tts
    prompt_codes = torch.randint(0, VB_CONFIG["cond_codebook_size"], (1, 4), generator=g)
    gen_tokens = torch.randint(0, VB_CONFIG["cond_codebook_size"], (1, 5), generator=g)
    gen_durations = torch.tensor([[1, 3, 2, 4, 1]])
    cond_codes = torch.cat([prompt_codes, torch.repeat_interleave(gen_tokens, gen_durations[0], dim=1)], 1)
    with torch.no_grad():
        rd_cond = vb_cond(vb, cond_codes)
    prompt_mel = torch.randn(1, 16, 128, generator=g)
    z, rd_out = vb_reverse(vb, rd_cond, prompt_mel)
    with float64():
        _, rd64 = vb_reverse(vb64, rd_cond.double(), prompt_mel.double(), z.double())
    for name, val, meaning in [("rd.prompt_codes", prompt_codes, "[1,4] prompt codes (12.5 Hz, expanded)"),
                               ("rd.gen_tokens", gen_tokens, "[1,5] generated tokens"),
                               ("rd.gen_durations", gen_durations, "[1,5] their durations"),
                               ("rd.cond_codes", cond_codes,
                                "[1,Tc] prompt codes ; repeat_interleave(tokens, durations)"),
                               ("rd.cond", rd_cond, "[1,4Tc,H] cond_emb x4"),
                               ("rd.prompt_mel", prompt_mel, "[1,16,128] prompt mel (random)"),
                               ("rd.z", z, "[1,4Tc-16,128] the first torch.randn inside reverse_diffusion")]:
        put(name, val, meaning)
    put("rd.out", rd_out, "reverse_diffusion(cond, prompt_mel, n_timesteps=4, cfg=2.0, rescale_cfg=0.75)",
        fp64_dev=dev(rd_out, rd64))
    # 3. the training objective (prompt kept / classifier-free drop), draws from the official RNG order
    speech = official_resample(espeak("Hello there."), 22050, 16000)
    lens = torch.tensor([10240, 8000])
    audio = torch.zeros(2, 10240)
    audio[0] = speech[:10240]
    audio[1, :8000] = speech[2000:10000]
    sem_codes = torch.randint(0, VB_CONFIG["cond_codebook_size"], (2, 1, 8), generator=g)
    sem_repr = torch.randn(2, VB_WRAPPER["ssl_feature_dim"], 8, generator=g)
    put("train.audio", audio, "[B,N] 16 kHz audio (zero-padded)")
    put("train.audio_lens", lens, "[B] 16 kHz lengths")
    put("train.semantic_codes", sem_codes, "[B,1,T/4] stands for _extract_dualcodec_features()['semantic_codes']")
    put("train.semantic_repr_ret", sem_repr, "[B,ssl,T/4] stands for ...['semantic_repr_ret']")
    found = {}
    for seed in range(100):
        cap = vb_training(wrapper, audio, lens, sem_codes, sem_repr, seed)
        case = "train_a" if bool((cap["prompt_len"] > 0).all()) else "train_b" if bool(
            (cap["prompt_len"] == 0).all()) else None
        if case and case not in found:
            found[case] = (seed, cap)
        if len(found) == 2:
            break
    put("train.mel", found["train_a"][1]["mel"], "[B,T,128] _extract_mel_features(audio) (16k->24k, normalised mel)")
    for case, (seed, cap) in sorted(found.items()):
        with float64(), torch.no_grad():
            flow64, hid64 = vb64.diff_estimator.forward_with_hidden_features(
                cap["x_t"].double(), cap["t"].double(), cap["cond_in"].double(), cap["x_mask"].double())
        put(f"{case}.torch_seed", torch.tensor(seed), "torch.manual_seed(seed) right before training_forward")
        for k in ("t", "z", "prompt_len", "x_t", "cond_in", "x_mask", "flow_pred", "repa_hidden", "loss",
                  "diff_loss", "repa_loss"):
            extra = ({"fp64_dev": dev(cap[k], flow64)} if k == "flow_pred" else
                     {"fp64_dev": dev(cap[k], hid64)} if k == "repa_hidden" else {})
            put(f"{case}.{k}", cap[k], k, **extra)
        log(f"voicebox {case}: seed {seed}, prompt_len {cap['prompt_len'].tolist()}, loss {float(cap['loss']):.4f}")
    log(f"voicebox fp64 dev: v {tensors['vf.v']['fp64_dev']:.2e}, rd.out {tensors['rd.out']['fp64_dev']:.2e}")
    spec = {"official": OFFICIAL, "config": VB_CONFIG, "wrapper_kwargs": VB_WRAPPER, "seed": SEED,
            "weights": "torch.manual_seed(seed); VoiceboxWrapper(voicebox_config=config, **wrapper_kwargs) (codec "
                       "stubbed); every LlamaAdaptiveRMSNorm.to_weight.bias = 1; p += 0.05*randn (Generator seed+1, "
                       "sorted names)",
            "calls": {"vf": "voicebox_model.diff_estimator(x_t, t, cond, x_mask) and .forward_with_hidden_features",
                      "rd": "voicebox_model.reverse_diffusion(cond, prompt=prompt_mel, n_timesteps=4, cfg=2.0, "
                            "rescale_cfg=0.75); z = its first torch.randn",
                      "train": "torch.manual_seed(seed); wrapper.training_forward({audio, audio_lens, x: None, "
                               "x_lens: None}) with _extract_dualcodec_features returning train.semantic_codes / "
                               "train.semantic_repr_ret; draws captured at voicebox_model.forward_diffusion and "
                               "diff_estimator.forward_with_hidden_features; train_a keeps the prompt, train_b is "
                               "the classifier-free drop (prompt_len 0, cond zeroed)"},
            "tensors": tensors}
    save_component(out, "voicebox", wrapper.state_dict(), io_t, spec)
    return spec


def verify_voicebox(shared: Path, log) -> dict:
    from safetensors.torch import load_file

    d = shared / "voicebox_tiny"
    spec = json.loads((d / "reference_cases.json").read_text())
    wrapper = build_official_voicebox(spec["config"], spec["wrapper_kwargs"],
                                      load_file(str(d / "state_dict.safetensors")))
    vb = wrapper.voicebox_model
    io_t = load_file(str(d / "reference_io.safetensors"))
    res = {}
    with torch.no_grad():
        res["vf.cond"] = dev(vb_cond(vb, io_t["vf.cond_codes"]), io_t["vf.cond"])
    v, h = vb_estimator(vb, io_t["vf.x_t"], io_t["vf.t"], io_t["vf.cond"], io_t["vf.x_mask"])
    res["vf.v"], res["vf.repa_hidden"] = dev(v, io_t["vf.v"]), dev(h, io_t["vf.repa_hidden"])
    z, out = vb_reverse(vb, io_t["rd.cond"], io_t["rd.prompt_mel"], io_t["rd.z"])
    res["rd.out"] = dev(out, io_t["rd.out"])
    for case in ("train_a", "train_b"):
        cap = vb_training(wrapper, io_t["train.audio"], io_t["train.audio_lens"], io_t["train.semantic_codes"],
                          io_t["train.semantic_repr_ret"], int(io_t[f"{case}.torch_seed"]))
        for k in ("mel", "t", "z", "x_t", "flow_pred", "repa_hidden", "loss"):
            res[f"{case}.{k}"] = dev(cap[k].float(), io_t[f"{case}.{k}"].float())
        res[f"{case}.prompt_len"] = dev(cap["prompt_len"].float(), io_t[f"{case}.prompt_len"].float())
    log(f"verify voicebox: max |Δ| {max(res.values()):.3g} ({max(res, key=res.get)})")
    return res


# ----------------------------------------------------------------------------------------------------------------
# 24 kHz / 50 Hz mel (flexicodec/nar_tts/melspec.py, voicebox_models.extract_normalized_mel_spec_50hz) + resampling
# ----------------------------------------------------------------------------------------------------------------
MEL_KW = {"sampling_rate": 24000, "n_fft": 1920, "num_mels": 128, "hop_size": 480, "win_size": 1920, "fmin": 0,
          "fmax": 12000}
MEL_FLOOR = 1e-5  # log(clamp(mel magnitude, 1e-5))


def official_mels(wav_in: torch.Tensor):
    from flexicodec.nar_tts.melspec import MelSpectrogram
    from flexicodec.nar_tts.voicebox_models import extract_normalized_mel_spec_50hz

    out = {"wav_16k": official_resample(wav_in, 22050, 16000)}
    out["wav_24k_from_in"] = official_resample(wav_in[None], 22050, 24000)
    out["wav_24k_from_16k"] = official_resample(out["wav_16k"][None], 16000, 24000)
    mel = MelSpectrogram(**MEL_KW).to(wav_in.dtype).eval()
    with torch.no_grad():
        out["logmel_24k_from_in"] = mel(out["wav_24k_from_in"])
    sys.modules["flexicodec.nar_tts.voicebox_models"]._mel_model_cache.clear()  # cached per device, float32
    with torch.no_grad():
        if wav_in.dtype == torch.float64:
            sys.modules["flexicodec.nar_tts.voicebox_models"]._mel_model_cache["cpu"] = mel
        out["mel_24k_from_in"] = extract_normalized_mel_spec_50hz(out["wav_24k_from_in"], device="cpu")
        out["mel_24k_from_16k"] = extract_normalized_mel_spec_50hz(out["wav_24k_from_16k"], device="cpu")
    sys.modules["flexicodec.nar_tts.voicebox_models"]._mel_model_cache.clear()
    return out, mel


def record_mel24k(out: Path, log) -> dict:
    wav_in = espeak("Hello.")
    res, mel = official_mels(wav_in)
    with float64():
        res64, _ = official_mels(wav_in.double())
    basis = mel.mel_basis
    nz = basis.nonzero().T.contiguous().to(torch.int32)
    io_t = {"wav_in": wav_in, **res, "mel_basis_index": nz, "mel_basis_value": basis[nz[0].long(), nz[1].long()],
            "hann_window": mel.hann_window}
    tensors = {"wav_in": describe(wav_in, "[N] espeak-ng en-us 'Hello.', 22050 Hz int16/32768"),
               "mel_basis_index": describe(nz, f"[2,nnz] (mel, bin) of the nonzero entries of MelSpectrogram.mel_basis "
                                               f"{list(basis.shape)} (librosa slaney filterbank); all others are 0"),
               "mel_basis_value": describe(io_t["mel_basis_value"], "[nnz] their values (float32 buffer)"),
               "hann_window": describe(mel.hann_window, "[1920] MelSpectrogram.hann_window buffer")}
    meanings = {"wav_16k": "torchaudio.functional.resample(wav_in, 22050, 16000)",
                "wav_24k_from_in": "resample(wav_in[None], 22050, 24000)",
                "wav_24k_from_16k": "resample(wav_16k[None], 16000, 24000) (the NAR training path)",
                "logmel_24k_from_in": "MelSpectrogram(...)(wav_24k_from_in): log(clamp(mel, 1e-5)) [1,128,T]",
                "mel_24k_from_in": "extract_normalized_mel_spec_50hz(wav_24k_from_in) = (logmel+4.92)/sqrt(8.14)",
                "mel_24k_from_16k": "extract_normalized_mel_spec_50hz(wav_24k_from_16k)"}
    for k, v in res.items():
        extra = {"fp64_dev": dev(v, res64[k])}
        if k.startswith(("logmel", "mel")):
            lg = (lambda x: x) if k.startswith("logmel") else (lambda x: x * math.sqrt(8.14) - 4.92)
            # bins on the last axis: [1,128,T] -> [T,128]
            extra["amp_dev"] = amp_dev(lg(v)[0].T, lg(res64[k])[0].T, 1, MEL_FLOOR)
            extra["bins_at_floor"] = int((lg(v) <= math.log(MEL_FLOOR) + 1e-4).sum())
        tensors[k] = describe(v, meanings[k], **extra)
        log(f"mel24k {k}: shape {list(v.shape)} fp64 dev {extra['fp64_dev']:.2e}"
            + (f" amplitude {extra['amp_dev']:.2e}, {extra['bins_at_floor']} bins at the floor"
               if "amp_dev" in extra else ""))
    spec = {"official": OFFICIAL, "class": f"flexicodec.nar_tts.melspec.MelSpectrogram(**{MEL_KW})",
            "normalisation": "(logmel + 4.92) / sqrt(8.14)", "resample": "torchaudio.functional.resample defaults "
            "(sinc_interp_hann, width 6, rolloff 0.99), torchaudio 2.11.0 functional.py", "tensors": tensors}
    save_component(out, "mel24k", None, io_t, spec)
    return spec


def verify_mel24k(shared: Path, log) -> dict:
    from safetensors.torch import load_file

    d = shared / "mel24k"
    io_t = load_file(str(d / "reference_io.safetensors"))
    sd = load_file(str(d / "state_dict.safetensors"))
    res, mel = official_mels(io_t["wav_in"])
    r = {k: dev(v, io_t[k]) for k, v in res.items()}
    r["mel_basis"], r["hann_window"] = dev(mel.mel_basis, sd["mel_basis"]), dev(mel.hann_window, sd["hann_window"])
    log(f"verify mel24k: max |Δ| {max(r.values()):.3g} {r}")
    return r


# ----------------------------------------------------------------------------------------------------------------
# Vocos (flexicodec/nar_tts/vocoder_model.py Vocos, mel_to_wav_vocos)
# ----------------------------------------------------------------------------------------------------------------
VOCOS_CONFIG = {"input_channels": 128, "dim": 16, "intermediate_dim": 48, "num_layers": 2, "n_fft": 1920,
                "hop_size": 480, "padding": "same"}


def build_official_vocos(config: dict, state: dict | None = None, seed: int = SEED):
    from flexicodec.nar_tts.vocoder_model import Vocos

    torch.manual_seed(seed)
    model = Vocos(**config)
    if state is None:
        randomize(model, seed)
    else:
        model.load_state_dict(state, strict=True)
    return model.eval()


def run_vocos(model, mel):
    from flexicodec.nar_tts.vocoder_model import mel_to_wav_vocos

    with torch.no_grad():
        return model.backbone(mel), mel_to_wav_vocos(model, mel)


def record_vocos(out: Path, log, mel: torch.Tensor) -> dict:
    model = build_official_vocos(VOCOS_CONFIG)
    backbone, wav = run_vocos(model, mel)
    with float64():
        b64, w64 = run_vocos(copy.deepcopy(model).double(), mel.double())
    io_t = {"mel": mel, "backbone_out": backbone, "wav": wav}
    tensors = {"mel": describe(mel, "[1,128,T] input = mel24k mel_24k_from_in (official normalised mel)"),
               "backbone_out": describe(backbone, "[1,T,dim] vocos.backbone(mel)", fp64_dev=dev(backbone, b64)),
               "wav": describe(wav, "[1,T*480] mel_to_wav_vocos(vocos, mel)", fp64_dev=dev(wav, w64))}
    log(f"vocos: T={mel.shape[-1]} fp64 dev backbone {dev(backbone, b64):.2e}, wav {dev(wav, w64):.2e}")
    spec = {"official": OFFICIAL, "config": VOCOS_CONFIG, "seed": SEED,
            "weights": "torch.manual_seed(seed); Vocos(**config); p += 0.05*randn (Generator seed+1, sorted names)",
            "call": "vocos.backbone(mel); mel_to_wav_vocos(vocos, mel) = vocos(mel).squeeze(1)", "tensors": tensors}
    save_component(out, "vocos", model.state_dict(), io_t, spec)
    return spec


def verify_vocos(shared: Path, log) -> dict:
    from safetensors.torch import load_file

    d = shared / "vocos_tiny"
    spec = json.loads((d / "reference_cases.json").read_text())
    model = build_official_vocos(spec["config"], load_file(str(d / "state_dict.safetensors")))
    io_t = load_file(str(d / "reference_io.safetensors"))
    backbone, wav = run_vocos(model, io_t["mel"])
    r = {"backbone_out": dev(backbone, io_t["backbone_out"]), "wav": dev(wav, io_t["wav"])}
    log(f"verify vocos: max |Δ| {r}")
    return r


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------
README = """# Bundled parity vectors (recorded from the official FlexiCodec code)

Written by `tools/record_parity_vectors.py`; checked by `tests/test_parity_bundled.py` (marker `parity`) on every
clone, with no dependency on `../shared`. `../shared/reference`, where present, stays the fuller set (larger
configurations and more cases, read by the other parity tests).

- Official code: `flexicodec=={version}` from the package index, byte-identical to `{repo}` @ `{commit}`
  ({git_check}). sha256 of every file: `manifest.json`.
- Recorded with torch {torch} on CPU, float32, 1 thread, `eval()`, `no_grad`; {machine}.
  Other versions: {versions}.
- Not the official stack (see the script's docstring for why no value depends on it): torchaudio is only the
  three pure-Python files `compliance/kaldi.py`, `functional/functional.py`, `functional/filtering.py`, verbatim
  from the torchaudio {ta_version} wheel (its C extension does not load with this torch); `audiotools` and
  `cached_path` are stubs; the frozen models that wrapper constructors load (the SenseVoice teacher inside
  `FlexiCodec`, the codec inside the AR/NAR wrappers) are not built.
- Weights: random (constructor init under `torch.manual_seed({seed})`, then `p += 0.05 * randn` from
  `Generator().manual_seed({seed1})` over sorted parameter names), dimensions reduced to keep the set small.
- Every tensor's meaning, shape and float32 rounding measure are in the component's JSON (`tensors`):
  `fp64_dev` = max |float32 output - float64 rerun of the same official code| (`amp_dev`: the same in the
  frame-normalised amplitude domain the tests use for log features). Integer outputs come with evidence that
  they are not on a decision edge (merge similarity margins, codes unchanged under 1e-5 relative input noise,
  greedy logit margins).

| folder | official code | what | files (bytes) |
|---|---|---|---|
{table}

`python tools/parity.py tests/data/parity/codec` runs the codec cases with the parity tool.
{verify}"""

COMPONENT_DOC = {
    "codec": ("`modeling_flexicodec.FlexiCodec` (`forward_features` + `decode_from_codes`)",
              "3 cases on one input: tau 1.0 all quantizers (no merging), tau 0.91 nq 2 (merged; the max-tokens cap "
              "of 3 splits a run), tau 0.8 nq 1 (heavier merging, cap active, no acoustic codes)"),
    "sensevoice": ("`feature_extractors.FBankGen` (dither 0) + `customized_sensevoice.SenseVoiceSmall` via "
                   "`modeling_flexicodec._extract_semantic_code`",
                   "fbank, LFR+CMVN and semantic features of 3 clips (speech with digital silence, noise, a clip "
                   "shorter than one frame); encoder d=32"),
    "ar_tts": ("`ar_tts.modeling_artts.TransformerLMWrapper`",
               "teacher forcing at both frame rates (B=2, padded), greedy KV-cached decoding with per-step logits, "
               "text front end (whisper BPE, espeak-ng G2P)"),
    "voicebox": ("`nar_tts.modeling_voicebox.VoiceboxWrapper` / `voicebox_models.VoiceBox` / `llama_nar.DiffLlama`",
                 "velocity estimator (padded), 4-step Euler sampler with CFG, training objective (prompt and "
                 "classifier-free-drop branches, official RNG draws)"),
    "vocos": ("`nar_tts.vocoder_model.Vocos`, `mel_to_wav_vocos`", "backbone output and waveform (dim 16)"),
    "mel24k": ("`nar_tts.melspec.MelSpectrogram`, `voicebox_models.extract_normalized_mel_spec_50hz`, "
               "`torchaudio.functional.resample`", "filterbank and window, resampling 22.05/16 -> 24 kHz, log-mel "
               "and normalised mel of espeak-ng speech"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", type=Path, required=True, help="pip --target directory holding flexicodec==0.1.2")
    ap.add_argument("--torchaudio-wheel", type=Path, required=True, help="torchaudio-2.11.0 wheel file")
    ap.add_argument("--official-git", type=Path, help="a clone of AmphionTeam/FlexiCodec: check the wheel's files "
                                                      "against the blobs of the pinned commit")
    ap.add_argument("--out", type=Path, default=OUT_DEFAULT)
    ap.add_argument("--verify-shared", type=Path, help="../shared/reference: rerun its cases through this script's "
                                                       "call sequences and report the differences")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    log = print
    with tempfile.TemporaryDirectory() as work:
        info = setup_official(args.official, args.torchaudio_wheel, Path(work), args.official_git)
        verify = {}
        if args.verify_shared is not None:
            for name, fn in [("flexicodec_tiny", verify_codec), ("sensevoice_tiny", verify_sensevoice),
                             ("ar_tts_tiny", verify_ar), ("voicebox_tiny", verify_voicebox),
                             ("vocos_tiny", verify_vocos), ("mel24k", verify_mel24k)]:
                verify[name] = fn(args.verify_shared, log)
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True)
        specs = {"mel24k": record_mel24k(args.out, log)}
        from safetensors.torch import load_file

        mel = load_file(str(args.out / "mel24k" / "io.safetensors"))["mel_24k_from_in"]
        specs["vocos"] = record_vocos(args.out, log, mel)
        specs["codec"] = record_codec(args.out, log)
        specs["sensevoice"] = record_sensevoice(args.out, log)
        specs["ar_tts"] = record_ar(args.out, log)
        specs["voicebox"] = record_voicebox(args.out, log)
    sizes = {name: {p.name: p.stat().st_size for p in sorted((args.out / name).iterdir())} for name in specs}
    total = sum(sum(v.values()) for v in sizes.values())
    machine = f"{platform.machine()} {platform.processor() or ''} ({_cpu_name()})".replace("  ", " ")
    manifest = {"official": info, "recorded_with": {"torch_threads": 1, "dtype": "float32", "device": "cpu",
                                                    "machine": machine, "python": platform.python_version()},
                "seed": SEED, "components": {k: COMPONENT_DOC[k][0] for k in specs}, "sizes_bytes": sizes,
                "total_bytes": total, "verify_shared": verify or None}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    table = "\n".join(f"| `{k}/` | {COMPONENT_DOC[k][0]} | {COMPONENT_DOC[k][1]} | "
                      + ", ".join(f"`{f}` {n:,}" for f, n in sizes[k].items()) + " |" for k in specs)
    vers = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if k != "torch" and v)
    vtext = ""
    if verify:
        vtext = ("\n## Check against ../shared/reference\n\n`--verify-shared` reran the shared cases (their inputs and "
                 "weights) through this script's call sequences; max |difference| from the stored outputs (integer "
                 "outputs: identical or not). The remaining float differences are rounding: the shared set was "
                 "recorded on another machine with 2 threads, and its codec and SenseVoice vectors with "
                 "amphionspace/FlexiCodec@86c6d52 and descript-audio-codec's layers (same formulas):\n\n"
                 + "\n".join(
                     f"- `{k}`: " + ", ".join(f"{kk} {vv:.3g}" if isinstance(vv, float) else f"{kk} {vv}"
                                             for kk, vv in v.items()) for k, v in verify.items()) + "\n")
    (args.out / "README.md").write_text(README.format(
        version=OFFICIAL["version"], repo=OFFICIAL["repo"], commit=OFFICIAL["commit"],
        git_check=info.get("git_check", "checked with --official-git when recording"), torch=torch.__version__,
        machine=machine, versions=vers, ta_version=info["torchaudio_subset"]["version"], seed=SEED, seed1=SEED + 1,
        table=table, verify=vtext))
    log(f"wrote {args.out}: {total / 1e6:.2f} MB")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
