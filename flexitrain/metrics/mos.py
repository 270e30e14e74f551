"""Non-intrusive MOS predictors, offline.

Backends (config ``eval.mos.backend``, weights at ``eval.mos.path``):

- ``dnsmos`` (default): Microsoft DNSMOS P.835 (SIG/BAK/OVRL) + P.808 ONNX models bundled in the
  ``speechmos`` wheel (packages ``speechmos onnxruntime librosa requests``; speechmos declares no
  dependencies). ``personalized=True`` uses the personalised P.835 model. Returns
  ``{"mos": OVRL, "dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak", "dnsmos_p808"}``.
  Scoring follows the reference script: clips shorter than 9.01 s are doubled until longer, then
  9.01 s windows with 1 s hops are averaged. ``fast=True`` instead repeats a short clip only up to
  exactly 9.01 s (one window, about 5x faster on 3-4 s clips; scores differ slightly).
- ``distillmos``: DistillMOS (``pip install --no-deps distillmos xls-r-sqa``), weights bundled in the
  package or a local checkpoint at ``path`` (``{"model": state_dict}`` or a bare state dict).
  Returns ``{"mos", "distillmos"}``. Out of domain on synthetic speech: use as a relative score.
- ``torchscript`` (alias ``utmos``): a TorchScript file called as ``model(wav[1, T] at 16 kHz)`` returning one score
  (e.g. a UTMOS predictor wrapped with its sample rate fixed, then scripted/traced).
  Returns ``{"mos", "torchscript_mos"}``.

Silent input gives NaN scores.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Mapping, Sequence

import numpy as np
import torch

from ._assets import cfg_get, import_optional, require_local_path, to_mono_16k

__all__ = ["MOS_BACKENDS", "MosPredictor", "DnsMos", "DistillMos", "TorchScriptMos", "build_mos_predictor",
           "build_mos_predictor_from_config", "build_mos_from_config"]

MOS_BACKENDS = ("dnsmos", "distillmos", "torchscript", "utmos")  # utmos = torchscript (a scripted UTMOS)
_DNSMOS_WINDOW = int(9.01 * 16000)


def _silent(x: np.ndarray) -> bool:
    return x.size == 0 or float(np.abs(x).max()) < 1e-6


class MosPredictor:
    """Interface: ``predict(wav, sample_rate) -> {"mos": float, ...}`` and ``predict_batch``."""

    keys: tuple[str, ...] = ("mos",)

    def predict(self, wav, sample_rate: int) -> dict[str, float]:
        raise NotImplementedError

    def predict_batch(self, wavs: Sequence, sample_rate: int) -> list[dict[str, float]]:
        return [self.predict(w, sample_rate) for w in wavs]

    def score(self, wav, sample_rate: int) -> float:
        """The headline MOS only (DNSMOS: OVRL)."""
        return self.predict(wav, sample_rate)["mos"]

    def _nan(self) -> dict[str, float]:
        return {k: float("nan") for k in self.keys}


class DnsMos(MosPredictor):
    keys = ("mos", "dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak", "dnsmos_p808")

    def __init__(self, path: str | None = None, personalized: bool = False, fast: bool = False,
                 num_threads: int | None = None, key: str = "eval.mos.path") -> None:
        local = None if path is None else require_local_path(
            path, key, "dir", "Expected a directory with sig_bak_ovr.onnx and model_v8.onnx.")
        backend_key = key.rsplit(".", 1)[0] + ".backend"
        import_optional("onnxruntime", "onnxruntime", backend_key)
        import_optional("librosa", "librosa", backend_key)
        import_optional("requests", "requests", backend_key)  # imported (unused) by speechmos.dnsmos
        dnsmos = import_optional("speechmos.dnsmos", "speechmos", backend_key)
        import onnxruntime as ort

        root = os.path.dirname(os.path.abspath(dnsmos.__file__))
        if local is None:
            primary = os.path.join(root, "pdnsmos_models" if personalized else "dnsmos_models", "sig_bak_ovr.onnx")
            p808 = os.path.join(root, "dnsmos_models", "model_v8.onnx")
        else:  # a directory holding sig_bak_ovr.onnx and model_v8.onnx
            primary, p808 = str(local / "sig_bak_ovr.onnx"), str(local / "model_v8.onnx")
        for f in (primary, p808):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"DNSMOS model {f} is missing; reinstall speechmos or fix {key}")
        self.model = dnsmos.DNSMOS(primary, p808)
        if num_threads is not None:  # rebuild the sessions with a thread cap (worker pools)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = int(num_threads)
            self.model.onnx_sess = ort.InferenceSession(primary, opts, providers=["CPUExecutionProvider"])
            self.model.p808_onnx_sess = ort.InferenceSession(p808, opts, providers=["CPUExecutionProvider"])
        self.personalized, self.fast = personalized, fast

    def predict(self, wav, sample_rate: int) -> dict[str, float]:
        x = to_mono_16k(wav, sample_rate)
        if _silent(x):
            return self._nan()
        if self.fast and len(x) < _DNSMOS_WINDOW:
            x = np.resize(x, _DNSMOS_WINDOW)  # repeats the clip cyclically
        r = self.model(x, 16000, self.personalized)
        out = {"dnsmos_ovrl": float(r["ovrl_mos"]), "dnsmos_sig": float(r["sig_mos"]),
               "dnsmos_bak": float(r["bak_mos"]), "dnsmos_p808": float(r["p808_mos"])}
        return {"mos": out["dnsmos_ovrl"], **out}


def _import_distillmos(key: str):
    # distillmos imports torchaudio only for its CLI, and torchaudio cannot load next to a CPU
    # torch build here. Register an empty stand-in just for this import, then remove it again so
    # other libraries' torchaudio availability checks are not fooled.
    stub = None
    if "torchaudio" not in sys.modules:
        try:
            import torchaudio  # noqa: F401
        except Exception:
            stub = sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        return import_optional("distillmos", "distillmos xls-r-sqa (with --no-deps)", key)
    finally:
        if stub is not None and sys.modules.get("torchaudio") is stub:
            del sys.modules["torchaudio"]


class DistillMos(MosPredictor):
    keys = ("mos", "distillmos")

    def __init__(self, path: str | None = None, device: str = "cpu", key: str = "eval.mos.path") -> None:
        ckpt = None if path is None else require_local_path(path, key, "file", "Expected a DistillMOS checkpoint.")
        dm = _import_distillmos(key.rsplit(".", 1)[0] + ".backend")
        model = dm.ConvTransformerSQAModel(load_weights=False)
        state = torch.load(str(ckpt) if ckpt else dm.sqa.DEFAULT_WEIGHTS_CHKPT, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state))
        self.model, self.device = model.to(device).eval(), device

    @torch.no_grad()
    def predict(self, wav, sample_rate: int) -> dict[str, float]:
        x = to_mono_16k(wav, sample_rate)
        if _silent(x):
            return self._nan()
        score = float(self.model(torch.from_numpy(x)[None].to(self.device)).reshape(-1)[0])
        return {"mos": score, "distillmos": score}


class TorchScriptMos(MosPredictor):
    keys = ("mos", "torchscript_mos")

    def __init__(self, path: str | None, device: str = "cpu", key: str = "eval.mos.path") -> None:
        if path is None:
            raise FileNotFoundError(f"{key} is required for backend torchscript: a TorchScript MOS predictor file")
        self.model = torch.jit.load(str(require_local_path(path, key, "file")), map_location=device).eval()
        self.device = device

    @torch.no_grad()
    def predict(self, wav, sample_rate: int) -> dict[str, float]:
        x = to_mono_16k(wav, sample_rate)
        if _silent(x):
            return self._nan()
        score = float(self.model(torch.from_numpy(x)[None].to(self.device)).reshape(-1)[0])
        return {"mos": score, "torchscript_mos": score}


def build_mos_predictor(backend: str = "dnsmos", path: str | None = None, device: str = "cpu",
                        key: str = "eval.mos", **options) -> MosPredictor:
    """Build an offline MOS predictor; ``options``: ``personalized``, ``fast``, ``num_threads`` (dnsmos)."""
    if backend not in MOS_BACKENDS:
        raise ValueError(f"{key}.backend={backend!r} is not supported; choose one of {MOS_BACKENDS}")
    if backend == "dnsmos":
        return DnsMos(path, key=f"{key}.path", **options)
    if options:
        raise ValueError(f"{key}: options {sorted(options)} only apply to backend dnsmos")
    cls = DistillMos if backend == "distillmos" else TorchScriptMos
    return cls(path, device=device, key=f"{key}.path")


def build_mos_predictor_from_config(cfg: Mapping | None, key: str = "eval.mos",
                                    device: str | None = None) -> MosPredictor:
    backend = cfg_get(cfg, "backend", "dnsmos")
    options = {}
    if backend == "dnsmos":
        options = {k: cfg_get(cfg, k) for k in ("personalized", "fast", "num_threads") if cfg_get(cfg, k) is not None}
    return build_mos_predictor(backend, cfg_get(cfg, "path"), device or cfg_get(cfg, "device", "cpu"), key=key, **options)


build_mos_from_config = build_mos_predictor_from_config  # short alias
