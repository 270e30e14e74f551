#!/usr/bin/env python
"""Honest training-step benchmark: the real `training_step` of a recipe's task, as a Lightning run executes it.

    python tools/bench_train.py                                   # codec_demo, its per-GPU batch, CPU
    python tools/bench_train.py --recipe codec_12hz --device cuda --batch 8 --seconds 6
    python tools/bench_train.py --task ar_tts --recipe ar_tts --device cuda          # also: voicebox, vocos
    python tools/bench_train.py --recipe codec_12hz --device cuda --compile --json out.json

What runs: the recipe's task (frozen assets replaced by random ones of the same size: random-init teacher,
random codec for the TTS targets when no checkpoint is configured, GAN on from step 0) inside a
`lightning.Trainer` built from the recipe's trainer config (one device, no validation, no checkpoint files)
with the recipe's loggers writing to a temporary directory at the recipe's `log_every_n_steps`, and the
recipe's callbacks (progress bar, LR monitor, ...; checkpoint callbacks left out). The data loader replays
one synthetic batch of the structure the task's data module yields, at the recipe's per-GPU batch
(`data.batch_seconds / crop`, or the AR token budget) unless `--batch/--seconds` are given.

One run = `--warmup` steps, `--steps` timed steps, then the instrumented steps (FLOPs, syncs, CUDA sync debug):
  * time: from one `on_train_batch_start` to the next, i.e. the whole step with Lightning's optimiser
    plumbing, logging, progress bar and the next batch's transfer; on CUDA measured with CUDA events (no
    extra synchronisation), on CPU with the host clock. Median (and mean) over the timed steps.
  * FLOPs: one whole step under `torch.utils.flop_counter.FlopCounterMode`, on the same module, device,
    precision and shapes as the timed steps, split per phase by hooks on the task's methods and modules
    (codec: `teacher_features`, `generator`, `discriminator`; TTS: `targets`) and by the kind of each
    backward (`LightningModule.backward`: a loss whose graph reaches only the discriminator's parameters is the
    D step). Backward FLOPs inside D during the generator backward are "G-side D"; the weight-gradient part
    of those (D's weight gradients from the generator loss, zeroed afterwards) is left out of "useful". With
    `--compile` the FLOP step runs eagerly (`torch.compiler.set_stance("force_eager")`): same math.
  * ops and syncs: one steady-state step (not one that writes to the loggers) under
    `flexitrain.utils.dispatch_count.SyncCounter`: dispatched aten ops; host syncs with their flexitrain/ source
    lines (on CPU every op that would sync on a GPU). `--count-log-step` also counts the next step that writes
    to the loggers (Lightning's `.item()` of every logged value; runs up to log_every_n_steps more steps).
  * CUDA only: one step under `torch.cuda.set_sync_debug_mode("warn")` (no Python modes: compiled code runs
    as in training), counting synchronizing CUDA calls.

MFU = useful FLOPs / median step time / peak dense TFLOP/s of the GPU at the run's precision (bf16/fp16: H100
SXM and H200 989, A100 312; TF32 or FP32 for 32-true), `--peak-tflops` to set it (CPU: n/a unless given).
The last line of the output is always

    bench_train: R audio-s/s | S ms/step | F TFLOP/step (useful U) | MFU M % of P TFLOP/s | ops/step O | syncs/step K

with R in audio-s/s (codec, vocos), speech-tokens/s (ar_tts) or mel-frames/s (voicebox).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

TASK_KINDS = ("codec", "ar_tts", "voicebox", "vocos")
DEFAULT_RECIPE = {"codec": "codec_demo", "ar_tts": "ar_tts_demo", "voicebox": "nar_voicebox_demo",
                  "vocos": "vocos_24k_demo"}
TASK_CLASSES = {"CodecTask": "codec", "ARTTSTask": "ar_tts", "VoiceboxTask": "voicebox", "VocosTask": "vocos"}
UNITS = {"codec": "audio-s/s", "vocos": "audio-s/s", "ar_tts": "speech-tokens/s", "voicebox": "mel-frames/s"}
# Phases per task, in print order; the first forward-default phase collects everything not hooked elsewhere.
PHASES = {
    "codec": ["teacher", "generator", "d_step", "g_side_d"],
    "vocos": ["generator", "d_step", "g_side_d"],
    "ar_tts": ["targets", "model"],
    "voicebox": ["targets", "model"],
}
PHASE_LABELS = {"teacher": "teacher (frozen)", "generator": "G forward + backward (incl. losses)",
                "d_step": "D step (D fwd fake+real, D loss backward)",
                "g_side_d": "G-side D forward + backward", "targets": "targets (frozen codec/teacher)",
                "model": "model forward + backward"}
# Peak dense TFLOP/s: (bf16/fp16 tensor core, TF32 tensor core, FP32), first matching name wins.
PEAKS = [("H200", 989.0, 494.0, 67.0), ("H100 PCIe", 756.0, 378.0, 51.0), ("H100", 989.0, 494.0, 67.0),
         ("A100", 312.0, 156.0, 19.5), ("L40S", 362.0, 183.0, 91.6), ("L4", 121.0, 60.0, 30.3)]
# Speech tokens per second at a merging threshold (README: 12.5 Hz -> 1.0, 8.3 -> 0.91, 6.25 -> 0.86).
TOKEN_RATES = {1.0: 12.5, 0.91: 8.3, 0.86: 6.25}


# ============================================================================ configuration
def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=TASK_KINDS, default=None, help="default: from the recipe's task")
    ap.add_argument("--recipe", default=None, help="default: codec_demo (or the task's demo recipe)")
    ap.add_argument("--batch", type=int, default=None, help="items per step (default: the recipe's per-GPU batch)")
    ap.add_argument("--seconds", type=float, default=None, help="audio seconds per item (default: the recipe's crop)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (median over them)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    ap.add_argument("--precision", default=None,
                    help="Lightning precision (default: the recipe's on GPU, 32-true on CPU)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    ap.add_argument("--compile", action="store_true", help="task.compile=true (if the task config has the key)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: from the GPU name)")
    ap.add_argument("--json", default=None, metavar="OUT", help="write every figure as JSON")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--logger", choices=("recipe", "csv", "none"), default="recipe",
                    help="recipe: the recipe's loggers (CSV + TensorBoard by default) into a temp dir")
    ap.add_argument("--callbacks", choices=("recipe", "none"), default="recipe",
                    help="recipe: the recipe's callbacks minus checkpointing (progress bar, LR monitor, ...)")
    ap.add_argument("--count-log-step", action="store_true",
                    help="also count ops/syncs on a step that writes to the loggers (runs up to "
                         "log_every_n_steps more steps)")
    ap.add_argument("--text-rate", type=float, default=4.2, help="ar_tts: text tokens per audio second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="also print the top dispatched ops")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. task.disc_start_step=0")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    return args


def _task_kind_of(cfg) -> str | None:
    target = str(cfg.task.get("_target_", ""))
    return next((kind for cls, kind in TASK_CLASSES.items() if target.endswith(cls)), None)


def _has_key(node, dotted: str) -> bool:
    for part in dotted.split("."):
        if node is None or not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def compose_config(args) -> tuple[Any, str, list[str], list[str]]:
    """(cfg, task kind, overrides applied, notes) for the recipe, with the benchmark's asset overrides."""
    from omegaconf import open_dict

    from flexitrain.utils.config import compose

    recipe = args.recipe or DEFAULT_RECIPE[args.task or "codec"]
    probe = compose([f"recipe={recipe}"], return_hydra_config=False)
    kind = _task_kind_of(probe)
    if kind is None:
        raise SystemExit(f"bench_train: recipe {recipe!r} builds {probe.task.get('_target_')}, not a known task")
    if args.task and args.task != kind:
        raise SystemExit(f"bench_train: recipe {recipe!r} is a {kind} recipe, not {args.task}")
    notes: list[str] = []
    extra: list[str] = []
    if kind == "codec":  # a random teacher of the configured depth, the GAN on from the first step
        extra += ["task.teacher.model_dir=null", "task.teacher.random_init=true", "task.disc_start_step=0"]
    elif kind == "vocos":
        extra += ["task.disc_start_step=0"]
    elif kind == "voicebox":
        if _has_key(probe, "task.teacher") and not probe.task.teacher.get("model_dir"):
            extra += ["task.teacher.random_init=true"]
    elif kind == "ar_tts":
        t = probe.task.targets
        if t.source == "codec" and t.get("teacher") is not None and not t.teacher.get("model_dir"):
            extra += ["task.targets.teacher.random_init=true"]
    if args.compile:
        if _has_key(probe, "task.compile"):
            extra.append("task.compile=true")
        else:
            notes.append("--compile: the task config has no 'compile' key; pass your own overrides")
    overrides = [f"recipe={recipe}", *extra, *args.overrides]
    cfg = compose(overrides)
    if kind == "voicebox" and not (cfg.task.get("codec") or {}).get("checkpoint") and \
            not (cfg.task.get("codec") or {}).get("model"):
        # No codec checkpoint configured: a random codec of the released size makes the same targets' work.
        codec_model = compose(["model=codec_released"], return_hydra_config=False).model
        with open_dict(cfg):
            cfg.task.codec = {"checkpoint": None, "model": codec_model, "random_init": True, "seed": 0}
        notes.append("voicebox: no task.codec.checkpoint: a RANDOM released-size FlexiCodec makes the targets")
    return cfg, kind, overrides, notes


def _peak(device: torch.device, precision: str) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, bf16, tf32, fp32 in PEAKS:
        if key in name:
            if "16" in precision:
                return bf16, f"{key} dense bf16/fp16"
            if _tf32_on():
                return tf32, f"{key} dense TF32"
            return fp32, f"{key} FP32"
    return None, f"unknown GPU {name!r}"


def _tf32_on() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
        except Exception:
            return torch.get_float32_matmul_precision() != "highest"


def _tf32_str() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = [f"float32_matmul_precision={torch.get_float32_matmul_precision()}"]
        for name, getter in (("matmul.allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
                             ("cudnn.allow_tf32", lambda: torch.backends.cudnn.allow_tf32)):
            try:
                parts.append(f"{name}={getter()}")
            except Exception:
                pass
    return ", ".join(parts)


# ============================================================================ shapes and batches
def recipe_shape(kind: str, cfg, recipe: str, text_rate: float) -> tuple[int, float, str]:
    """(batch, seconds, how) of the recipe's per-GPU batch."""
    data = cfg.data
    if kind == "ar_tts":
        seconds = 3.0 if "demo" in recipe else min(30.0, float(data.get("max_duration") or 30.0))
        thresholds = [float(x) for x in cfg.task.targets.thresholds]
        speech = max(_speech_len(seconds, t) for t in thresholds) if cfg.task.targets.source == "shards" \
            else math.ceil(seconds * 12.5)
        size = speech + round(seconds * text_rate)
        batch = max(1, min(int(data.max_batch_size), int(data.token_budget) // size))
        return batch, seconds, f"token_budget {data.token_budget} // {size} tokens, max {data.max_batch_size}"
    seconds = data.get("train_crop_seconds")
    if not seconds:
        raise SystemExit("bench_train: the recipe has no data.train_crop_seconds: give --seconds")
    sr = int(data.sample_rate)
    budget = max(1, int(round(float(data.batch_seconds) * sr)))
    batch = max(1, min(int(data.max_batch_size), budget // int(math.ceil(float(seconds) * sr))))
    return batch, float(seconds), f"batch_seconds {data.batch_seconds} / crop {seconds} s, max {data.max_batch_size}"


def _token_rate(threshold: float) -> float:
    known = sorted(TOKEN_RATES.items())
    for (t0, r0), (t1, r1) in zip(known, known[1:]):
        if t0 <= threshold <= t1:
            return r0 + (r1 - r0) * (threshold - t0) / (t1 - t0)
    return known[0][1] if threshold < known[0][0] else known[-1][1]


def _speech_len(seconds: float, threshold: float) -> int:
    return max(1, round(seconds * _token_rate(threshold)))


def _audio_batch(batch: int, n: int, g: torch.Generator) -> dict:
    """What `flexitrain.data.batching.collate` yields for full-length crops."""
    return {"audio": 0.1 * torch.randn(batch, 1, n, generator=g), "lengths": torch.full((batch,), n, dtype=torch.long),
            "offsets": torch.zeros(batch), "keys": [f"bench/{i:06d}" for i in range(batch)],
            "texts": [""] * batch, "speakers": [f"spk{i}" for i in range(batch)], "languages": ["en"] * batch}


def make_batch(kind: str, task, cfg, batch: int, seconds: float, text_rate: float, seed: int) -> tuple[dict, dict]:
    """(batch, work): work = {"units": per-step amount in the final line's unit, "audio_seconds": ...}."""
    g = torch.Generator().manual_seed(seed)
    if kind == "codec":
        sr = int(task.generator.sample_rate)
        n = int(round(seconds * sr))
        return _audio_batch(batch, n, g), {"units": batch * n / sr, "audio_seconds": batch * n / sr}
    if kind == "vocos":
        sr = int(cfg.data.sample_rate)
        n = int(round(seconds * sr))
        return _audio_batch(batch, n, g), {"units": batch * n / sr, "audio_seconds": batch * n / sr}
    if kind == "voicebox":
        from flexitrain.audio.mel24k import mel_frames

        sr = int(cfg.data.sample_rate)
        n = int(round(seconds * sr))
        b = _audio_batch(batch, n, g)
        return b, {"units": float(mel_frames(b["lengths"], sr).sum()), "audio_seconds": batch * n / sr}
    # ar_tts
    from flexitrain.tasks.ar_tts_data import threshold_key

    model = task.model
    n_text = max(1, round(seconds * text_rate))
    text_vocab = int(model.text_embedding.num_embeddings)
    b = {"keys": [f"bench/{i:06d}" for i in range(batch)],
         "text": torch.randint(1, text_vocab, (batch, n_text), generator=g),
         "text_lengths": torch.full((batch,), n_text, dtype=torch.long)}
    if task.source == "shards":
        tokens = []
        for thr in task.thresholds:
            k, n = threshold_key(thr), _speech_len(seconds, thr)
            mean_dur = 12.5 / _token_rate(thr)
            b[f"speech/{k}"] = torch.randint(0, model.speech_token_size, (batch, n), generator=g)
            b[f"durations/{k}"] = torch.randint(1, min(8, max(2, round(2 * mean_dur))) + 1, (batch, n), generator=g)
            b[f"speech_lengths/{k}"] = torch.full((batch,), n, dtype=torch.long)
            tokens.append(batch * n)
        return b, {"units": sum(tokens) / len(tokens), "audio_seconds": batch * seconds}
    sr = int(cfg.data.sample_rate)
    n = int(round(seconds * sr))
    b["audio"] = 0.1 * torch.randn(batch, n, generator=g)
    b["audio_lengths"] = torch.full((batch,), n, dtype=torch.long)
    # Targets come from the frozen codec: count them once (this also fills the task's target cache, as the
    # first training step would).
    counts = []
    for thr in task.thresholds:
        _, _, num = task.targets(b, thr)
        counts.append(float(num.sum()))
    return b, {"units": sum(counts) / len(counts), "audio_seconds": batch * n / sr}


class _Replay(torch.utils.data.Dataset):
    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return dict(self.batch)


def _collate_none(b):
    return b


# ============================================================================ per-phase FLOPs
class PhaseFlops:
    """Attributes every FLOP that a `FlopCounterMode` counts to one phase of the step (see module docstring)."""

    def __init__(self, task, kind: str, fc):
        from torch.multiprocessing.reductions import StorageWeakRef

        self._weak = StorageWeakRef
        self.task, self.kind, self.fc = task, kind, fc
        self.phases = PHASES[kind]
        self.default = "generator" if kind in ("codec", "vocos") else "model"
        self.flops: Counter = Counter({p: 0 for p in self.phases})
        self.wasted = 0                  # D weight-gradient FLOPs in the generator backward
        self.pending_d = 0               # D forward FLOPs until the next backward says which pass they were
        self.stack: list[str] = []
        self.backward_kind: str | None = None
        self.backwards: list[dict] = []
        self.missing: list[str] = []
        self._d_weights: dict = {}
        self._d_acts: dict = {}
        self._handles: list = []
        self._wrapped: list[str] = []
        self.disc = getattr(task, "discriminator", None) if kind in ("codec", "vocos") else None
        self._d_params = {id(p) for p in self.disc.parameters()} if self.disc is not None else set()

    # ---------------------------------------------------------------- hooks
    def install(self) -> None:
        methods = {"codec": {"teacher_features": "teacher"}, "ar_tts": {"targets": "targets"},
                   "voicebox": {"targets": "targets"}, "vocos": {}}[self.kind]
        for name, phase in methods.items():
            if not callable(getattr(self.task, name, None)):
                self.missing.append(f"task.{name}")
                continue
            self._wrap_method(name, phase)
        if self.kind in ("codec", "vocos"):
            for attr, phase in (("generator", "generator"), ("discriminator", "D")):
                mod = getattr(self.task, attr, None)
                if isinstance(mod, torch.nn.Module):
                    self._hook_module(mod, phase)
                else:
                    self.missing.append(f"task.{attr}")
        self._wrap_backward()
        orig = self.fc._count_flops

        def count(func_packet, out, args, kwargs):
            if func_packet not in self.fc.flop_registry:
                return orig(func_packet, out, args, kwargs)
            before = self.fc.flop_counts["Global"][func_packet]
            result = orig(func_packet, out, args, kwargs)
            self._attribute(func_packet, out, args, kwargs, self.fc.flop_counts["Global"][func_packet] - before)
            return result

        self.fc._count_flops = count

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for name in self._wrapped:
            self.task.__dict__.pop(name, None)
        self.fc.__dict__.pop("_count_flops", None)
        self.flops[self.phases[-1] if self.disc is not None else self.default] += self.pending_d
        self.pending_d = 0

    def _wrap_method(self, name: str, phase: str) -> None:
        orig = getattr(self.task, name)

        def wrapped(*a, **k):
            self.stack.append(phase)
            try:
                return orig(*a, **k)
            finally:
                self.stack.pop()

        self.task.__dict__[name] = wrapped
        self._wrapped.append(name)

    def _hook_module(self, mod: torch.nn.Module, phase: str) -> None:
        def pre(_m, _a):
            self.stack.append(phase)

        def post(_m, _a, _o):
            if self.stack and self.stack[-1] == phase:
                self.stack.pop()

        self._handles.append(mod.register_forward_pre_hook(pre))
        self._handles.append(mod.register_forward_hook(post, always_call=True))

    def _wrap_backward(self) -> None:
        orig = self.task.backward

        def backward(loss, *a, **k):
            kind = self._backward_kind(loss)
            if self.disc is not None:  # the D forwards since the last backward belong to this pass
                self.flops["d_step" if kind == "d" else "g_side_d"] += self.pending_d
                self.pending_d = 0
            start = sum(self.flops.values()) + self.wasted
            self.backward_kind = kind
            try:
                return orig(loss, *a, **k)
            finally:
                self.backward_kind = None
                self.backwards.append({"kind": "D loss" if kind == "d" else "G loss" if self.disc is not None
                                       else "loss",
                                       "flops": sum(self.flops.values()) + self.wasted - start})
                if kind == "d":  # D-step activations are freed now: forget them
                    self._d_weights.clear()
                    self._d_acts.clear()

        self.task.__dict__["backward"] = backward
        self._wrapped.append("backward")

    def _backward_kind(self, loss) -> str:
        """'d' if the loss's graph reaches discriminator parameters only, else 'g'."""
        if self.disc is None or getattr(loss, "grad_fn", None) is None:
            return "g"
        seen, todo, reached_d = set(), [loss.grad_fn], False
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            var = getattr(node, "variable", None)
            if var is not None:
                if id(var) in self._d_params:
                    reached_d = True
                else:
                    return "g"
            todo.extend(fn for fn, _ in node.next_functions)
        return "d" if reached_d else "g"

    # ---------------------------------------------------------------- attribution
    def _key(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return None
        try:
            s = t.untyped_storage()
            return (str(t.device), s.data_ptr()), s
        except Exception:
            return None

    def _remember(self, table: dict, t) -> None:
        ks = self._key(t)
        if ks is not None:
            table[ks[0]] = self._weak(ks[1])

    def _known(self, table: dict, t) -> bool:
        ks = self._key(t)
        if ks is None:
            return False
        ref = table.get(ks[0])
        return ref is not None and not ref.expired()

    def _attribute(self, packet, out, args, kwargs, flops: int) -> None:
        aten = torch.ops.aten
        if self.backward_kind is None:
            phase = self.stack[-1] if self.stack else self.default
            if phase == "D":
                self.pending_d += flops
                if packet is aten.convolution:
                    self._remember(self._d_weights, args[1])
                    self._remember(self._d_acts, args[0])
                elif packet in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm):
                    a, b = (args[1], args[2]) if packet in (aten.addmm, aten.baddbmm) else (args[0], args[1])
                    self._remember(self._d_acts, a)
                    self._remember(self._d_weights, b)
                return
            self.flops[phase] += flops
            return
        if self.backward_kind == "d":
            self.flops["d_step"] += flops
            return
        if self.disc is None:
            self.flops[self.default] += flops
            return
        # The generator backward: ops inside D (by the weights/activations its forward used) are G-side D.
        if packet is aten.convolution_backward and self._known(self._d_weights, args[2]):
            self.flops["g_side_d"] += flops
            mask = list(args[10]) if len(args) > 10 else list(kwargs.get("output_mask", [True, True, True]))
            if mask[1]:
                wargs = list(args)
                wargs[10] = [False, True, False]
                self.wasted += int(self.fc.flop_registry[packet](*wargs, out_val=out))
            return
        if packet in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if any(self._known(self._d_weights, t) for t in tensors):
                self.flops["g_side_d"] += flops           # gradient w.r.t. D's input
                return
            if any(self._known(self._d_acts, t) for t in tensors):
                self.flops["g_side_d"] += flops           # gradient w.r.t. D's weights: thrown away
                self.wasted += flops
                return
        self.flops[self.default] += flops


def extra_flop_formulas() -> dict:
    """FLOP formulas FlopCounterMode lacks: CPU flash attention (what SDPA runs on CPU) and its backward."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    out = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:
        out[fwd] = lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)
    if bwd is not None:
        out[bwd] = lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)
    return out


# ============================================================================ the Lightning side
class BenchCallback(L.Callback):
    """Marks each step's start; opens/closes the instrumented windows (see the module docstring)."""

    def __init__(self, kind: str, device: torch.device, warmup: int, steps: int, compile_on: bool,
                 log_every_n: int = 50, count_log_step: bool = False):
        self.kind, self.device = kind, device
        self.cuda = device.type == "cuda"
        self.timed = range(warmup, warmup + steps)
        self.flop_step = warmup + steps
        self.sync_step = self.flop_step + 1
        if (self.sync_step + 1) % max(1, log_every_n) == 0:  # a steady-state step: not one that writes logs
            self.sync_step += 1
        self.cuda_step = self.sync_step + 1 if self.cuda else None
        last = self.cuda_step or self.sync_step
        # --count-log-step: also count the first later step on which Lightning writes to the loggers
        self.log_step = None
        if count_log_step:
            self.log_step = next(i for i in range(last + 1, last + 2 + log_every_n) if (i + 1) % log_every_n == 0)
            last = self.log_step
        # one more batch: every window runs from one step's start to the next one's (which includes loading and
        # moving the next batch, as in a run), the last instrumented step's too
        self.total = last + 2
        self.log_counter = None
        self.compile_on = compile_on
        self.host_marks: dict[int, float] = {}
        self.events: dict[int, Any] = {}
        self._close = None
        self.flop_result: dict = {}
        self.sync_counter = None
        self.cuda_debug = None
        self.logging_steps: dict[str, bool] = {}

    # the window of step i ends where step i+1 starts (or at the epoch's end for the last one)
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._finish()
        if batch_idx in self.timed or batch_idx == self.flop_step:
            if self.cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                self.events[batch_idx] = ev
            self.host_marks[batch_idx] = time.perf_counter()
        if batch_idx == self.flop_step:
            self._open_flops(pl_module)
        elif batch_idx == self.sync_step:
            self._note_logging(trainer, "sync_step")
            from flexitrain.utils.dispatch_count import SyncCounter

            self.sync_counter = SyncCounter(cpu_as_device=not self.cuda)
            self.sync_counter.__enter__()
            self._close = lambda: self.sync_counter.__exit__(None, None, None)
        elif batch_idx == self.log_step:
            self._note_logging(trainer, "log_step")
            from flexitrain.utils.dispatch_count import SyncCounter

            self.log_counter = SyncCounter(cpu_as_device=not self.cuda)
            self.log_counter.__enter__()
            self._close = lambda: self.log_counter.__exit__(None, None, None)
        elif batch_idx == self.cuda_step:
            from flexitrain.utils.dispatch_count import CudaSyncDebug

            self.cuda_debug = CudaSyncDebug().__enter__()
            self._close = lambda: self.cuda_debug.__exit__(None, None, None)

    def on_train_epoch_end(self, trainer, pl_module):
        self._finish()

    def on_train_end(self, trainer, pl_module):
        self._finish()

    def _finish(self):
        if self._close is not None:
            close, self._close = self._close, None
            close()

    def _note_logging(self, trainer, name):
        try:
            n = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
            self.logging_steps[name] = n % max(1, int(trainer.log_every_n_steps)) == 0
        except Exception:
            pass

    def _open_flops(self, task):
        from torch.utils.flop_counter import FlopCounterMode

        fc = FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())
        tracker = PhaseFlops(task, self.kind, fc)
        tracker.install()
        stance = nullcontext()
        if self.compile_on and hasattr(torch.compiler, "set_stance"):
            stance = torch.compiler.set_stance("force_eager")
        stance.__enter__()
        fc.__enter__()

        def close():
            try:
                fc.__exit__(None, None, None)
            finally:
                stance.__exit__(None, None, None)
                tracker.remove()
            total = int(fc.get_total_flops())
            phases = {p: int(tracker.flops[p]) for p in tracker.phases}
            self.flop_result = {"total": total, "phases": phases, "wasted": int(tracker.wasted),
                                "useful": total - int(tracker.wasted), "backwards": tracker.backwards,
                                "missing_hooks": tracker.missing, "by_op": {
                                    str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}}
        self._close = close

    # ---------------------------------------------------------------- results
    def step_times(self) -> list[float]:
        """Seconds of each timed step: start(i) -> start(i+1)."""
        out = []
        for i in self.timed:
            j = i + 1
            if self.cuda and i in self.events and j in self.events:
                out.append(self.events[i].elapsed_time(self.events[j]) / 1000.0)
            elif i in self.host_marks and j in self.host_marks:
                out.append(self.host_marks[j] - self.host_marks[i])
        return out

    def host_step_times(self) -> list[float]:
        return [self.host_marks[i + 1] - self.host_marks[i] for i in self.timed
                if i in self.host_marks and i + 1 in self.host_marks]


def _loggers(cfg, mode: str) -> list:
    from hydra.utils import instantiate

    if mode == "none":
        return []
    if mode == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return [CSVLogger(cfg.paths.output_dir, name="csv", version="")]
    out = []
    for conf in (cfg.get("logger") or {}).values():
        if conf is not None and "_target_" in conf:
            if "Wandb" in conf["_target_"]:
                continue  # no network from a benchmark
            out.append(instantiate(conf))
    return out


def _callbacks(cfg, mode: str, have_logger: bool) -> tuple[list, list[str]]:
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor

    if mode == "none":
        return [], []
    kept, names = [], []
    for conf in (cfg.get("callbacks") or {}).values():
        if conf is None or "_target_" not in conf:
            continue
        cb = instantiate(conf)
        if isinstance(cb, Checkpoint) or (isinstance(cb, LearningRateMonitor) and not have_logger):
            continue
        kept.append(cb)
        names.append(type(cb).__name__)
    return kept, names


def _sites(sc) -> dict:
    """'kind at file:line' -> count; outside flexitrain/ with the two next outer frames (who called it)."""
    out: Counter = Counter()
    for e in sc.events:
        site = f"{e.kind} at {e.location}"
        if not e.location.startswith("flexitrain/") and len(e.stack) > 1:
            callers = [f for f in e.stack[1:] if "/utilities/" not in f and "lightning_utilities/" not in f][:2]
            if callers:
                site += " <- " + " <- ".join(callers)
        out[site] += 1
    return dict(out)


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters()) if isinstance(module, torch.nn.Module) else 0


def _fmt_tflop(x: float) -> str:
    return f"{x:.4g}" if x >= 1e-3 else f"{x:.3e}"


# ============================================================================ main
def main(argv=None) -> dict:
    args = _parse(argv)
    from hydra.utils import instantiate
    from omegaconf import OmegaConf, open_dict

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cfg, kind, overrides, notes = compose_config(args)
    recipe = args.recipe or DEFAULT_RECIPE[args.task or "codec"]
    precision = args.precision or (str(cfg.trainer.get("precision", "32-true")) if device.type == "cuda" else "32-true")
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
    with open_dict(cfg):
        cfg.paths.output_dir = tmp.name
    L.seed_everything(args.seed + int(cfg.get("seed") or 0), verbose=False)
    task = instantiate(cfg.task, _recursive_=False)
    batch_default, seconds_default, how = recipe_shape(kind, cfg, recipe, args.text_rate)
    bsz = args.batch or batch_default
    seconds = args.seconds or seconds_default
    shape_src = "recipe per-GPU batch" if (args.batch is None and args.seconds is None) else "given"
    batch, work = make_batch(kind, task, cfg, bsz, seconds, args.text_rate, args.seed)

    compile_val = OmegaConf.to_container(cfg.task, resolve=True).get("compile", None)
    compile_on = bool(compile_val) and compile_val != {"enabled": False}
    loggers = _loggers(cfg, args.logger)
    callbacks, cb_names = _callbacks(cfg, args.callbacks, bool(loggers))
    log_every = int(cfg.trainer.get("log_every_n_steps") or 50)
    bench = BenchCallback(kind, device, args.warmup, args.steps, compile_on, log_every, args.count_log_step)
    tkw = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if k != "_target_"}
    strategy = tkw.get("strategy", "auto")
    strategy = strategy.get("_target_", strategy) if isinstance(strategy, dict) else strategy
    if str(strategy) != "auto" or tkw.get("devices") not in (1, "1", None):
        notes.append(f"one device, strategy auto (the recipe's trainer: devices {tkw.get('devices')}, "
                     f"strategy {strategy}): no DDP gradient all-reduce in these figures")
    tkw.update(accelerator="gpu" if device.type == "cuda" else "cpu",
               devices=[device.index or 0] if device.type == "cuda" else 1, num_nodes=1, strategy="auto",
               precision=precision, max_steps=-1, max_epochs=1, min_steps=None, min_epochs=None,
               val_check_interval=1.0, check_val_every_n_epoch=1, limit_val_batches=0, limit_train_batches=None,
               num_sanity_val_steps=0, enable_checkpointing=False, enable_model_summary=False,
               logger=loggers or False, callbacks=[*callbacks, bench], default_root_dir=tmp.name)
    if args.cudnn_benchmark:
        tkw["benchmark"] = True
    if args.callbacks == "none":
        tkw["enable_progress_bar"] = False
    if "enable_progress_bar" in tkw and not tkw["enable_progress_bar"]:
        callbacks[:] = [c for c in callbacks if "ProgressBar" not in type(c).__name__]
        tkw["callbacks"] = [*callbacks, bench]
    trainer = L.Trainer(**tkw)
    loader = torch.utils.data.DataLoader(_Replay(batch, bench.total), batch_size=None, collate_fn=_collate_none)
    t0 = time.perf_counter()
    trainer.fit(task, train_dataloaders=loader)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0

    # ------------------------------------------------------------ figures
    times = bench.step_times()
    if len(times) < args.steps:
        raise SystemExit(f"bench_train: only {len(times)} of {args.steps} timed steps ran "
                         f"(global_step {trainer.global_step}); is max_steps limiting the run?")
    step_s = statistics.median(times)
    fl = bench.flop_result
    total, useful = fl.get("total", 0), fl.get("useful", 0)
    peak, peak_what = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else _peak(device, precision)
    mfu = useful / step_s / (peak * 1e12) * 100 if peak else None
    mfu_total = total / step_s / (peak * 1e12) * 100 if peak else None
    sc = bench.sync_counter
    ops, syncs = (sc.ops, sc.syncs) if sc is not None else (None, None)
    rate = work["units"] / step_s
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cudnn_bench = bool(torch.backends.cudnn.benchmark)
    modules = {"generator": _params(getattr(task, "generator", None)),
               "discriminator": _params(getattr(task, "discriminator", None)),
               "model": _params(getattr(task, "model", None) or getattr(task, "nar", None))}
    result = {
        "task": kind, "recipe": recipe, "overrides": overrides, "notes": notes,
        "device": str(device), "gpu": gpu, "threads": torch.get_num_threads(), "precision": precision,
        "cudnn_benchmark": cudnn_bench, "tf32": _tf32_str() if device.type == "cuda" else None,
        "compile": compile_on, "compile_cfg": compile_val, "torch": torch.__version__,
        "batch": bsz, "seconds": seconds, "shape": shape_src, "recipe_batch": [batch_default, seconds_default, how],
        "log_every_n_steps": trainer.log_every_n_steps, "loggers": [type(lg).__name__ for lg in loggers],
        "callbacks": cb_names, "warmup": args.warmup, "steps": args.steps,
        "step_ms": {"median": step_s * 1e3, "mean": statistics.fmean(times) * 1e3, "min": min(times) * 1e3,
                    "max": max(times) * 1e3, "all": [t * 1e3 for t in times],
                    "host_median": statistics.median(bench.host_step_times()) * 1e3,
                    "clock": "cuda events" if device.type == "cuda" else "host"},
        "unit": UNITS[kind], "rate": rate, "units_per_step": work["units"],
        "audio_seconds_per_s": work["audio_seconds"] / step_s,
        "flops": {**fl, "step": bench.flop_step, "how": f"FlopCounterMode over one whole step in-run "
                  f"({device}, {precision}, timed shapes)" + (", eager (force_eager)" if compile_on else "")},
        "tflop_per_step": total / 1e12, "useful_tflop_per_step": useful / 1e12,
        "peak_tflops": peak, "peak_source": peak_what, "mfu_pct": mfu, "mfu_total_pct": mfu_total,
        "ops_per_step": ops, "syncs_per_step": syncs,
        "sync_sites": _sites(sc) if sc is not None else {},
        "host_only_reads": dict(sc.host_only) if sc is not None else {},
        "sync_kinds": dict(sc.sync_counts) if sc is not None else {},
        "sync_events": [{"kind": e.kind, "location": e.location, "stack": list(e.stack)} for e in sc.events]
        if sc is not None else [],
        "sync_step_logged": bench.logging_steps.get("sync_step"), "sync_step": bench.sync_step,
        "log_step": bench.log_step, "log_step_logged": bench.logging_steps.get("log_step"),
        "log_step_ops": bench.log_counter.ops if bench.log_counter is not None else None,
        "log_step_syncs": bench.log_counter.syncs if bench.log_counter is not None else None,
        "log_step_sync_sites": _sites(bench.log_counter) if bench.log_counter is not None else None,
        "cuda_sync_warnings": bench.cuda_debug.count if bench.cuda_debug is not None else None,
        "cuda_sync_sites": dict(Counter(bench.cuda_debug.warnings)) if bench.cuda_debug is not None else None,
        "params": modules, "wall_s": wall, "global_step": int(trainer.global_step),
    }
    if sc is not None and args.verbose:
        result["top_ops"] = sc.op_counts.most_common(25)
    tmp.cleanup()
    _print(result, sc, args.verbose)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    print(final_line(result))
    return result


def final_line(r: dict) -> str:
    tf, tu = r["tflop_per_step"], r["useful_tflop_per_step"]
    mfu = f"{r['mfu_pct']:.2f}" if r["mfu_pct"] is not None else "n/a"
    peak = f"{r['peak_tflops']:g}" if r["peak_tflops"] else "n/a"
    ops = r["ops_per_step"] if r["ops_per_step"] is not None else "n/a"
    syncs = r["syncs_per_step"] if r["syncs_per_step"] is not None else "n/a"
    rate = f"{r['rate']:.1f}" if r["rate"] >= 100 else f"{r['rate']:.4g}"
    return (f"bench_train: {rate} {r['unit']} | {r['step_ms']['median']:.1f} ms/step | "
            f"{_fmt_tflop(tf)} TFLOP/step (useful {_fmt_tflop(tu)}) | MFU {mfu} % of {peak} TFLOP/s | "
            f"ops/step {ops} | syncs/step {syncs}")


def _print(r: dict, sc, verbose: bool) -> None:
    p = print
    p(f"[bench_train] task {r['task']} | recipe {r['recipe']} | torch {r['torch']}")
    p(f"  device {r['device']}" + (f" ({r['gpu']})" if r["gpu"] else f" ({r['threads']} threads)")
      + f" | precision {r['precision']} | cudnn.benchmark {r['cudnn_benchmark']} | TF32 "
      + (r["tf32"] or "n/a (cpu)") + f" | compile {'on' if r['compile'] else 'off'}")
    rb = r["recipe_batch"]
    p(f"  batch {r['batch']} x {r['seconds']:g} s ({r['shape']}; recipe per-GPU batch {rb[0]} x {rb[1]:g} s: {rb[2]})")
    p(f"  loggers {', '.join(r['loggers']) or 'none'} (log_every_n_steps {r['log_every_n_steps']}) | callbacks "
      f"{', '.join(r['callbacks']) or 'none'} | params " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in
                                                                     r["params"].items() if v))
    p(f"  overrides: {' '.join(r['overrides'])}")
    for n in r["notes"]:
        p(f"  note: {n}")
    s = r["step_ms"]
    p(f"  steps: {r['warmup']} warm-up + {r['steps']} timed ({s['clock']} clock): median {s['median']:.1f} ms, "
      f"mean {s['mean']:.1f}, min {s['min']:.1f}, max {s['max']:.1f} (host median {s['host_median']:.1f})")
    p(f"  throughput: {r['rate']:.1f} {r['unit']} ({r['units_per_step']:.4g} per step), "
      f"{r['audio_seconds_per_s']:.1f} audio-s/s")
    fl = r["flops"]
    total = fl.get("total", 0)
    p(f"  FLOPs: {fl['how']}, step #{fl['step']}: {total / 1e12:.6g} TFLOP, useful {fl.get('useful', 0) / 1e12:.6g} "
      f"(D weight gradients thrown away: {fl.get('wasted', 0) / 1e12:.6g})")
    for name, v in fl.get("phases", {}).items():
        p(f"    {PHASE_LABELS.get(name, name):45s} {v / 1e12:12.6g} TFLOP  {100 * v / max(total, 1):5.1f} %")
    for b in fl.get("backwards", []):
        p(f"    backward of the {b['kind']}: {b['flops'] / 1e12:.6g} TFLOP")
    if fl.get("missing_hooks"):
        p(f"    (not found, not split out: {', '.join(fl['missing_hooks'])})")
    if r["mfu_pct"] is not None:
        p(f"  MFU {r['mfu_pct']:.2f} % useful, {r['mfu_total_pct']:.2f} % all FLOPs, of {r['peak_tflops']:g} "
          f"TFLOP/s ({r['peak_source']})")
    else:
        p(f"  MFU n/a ({r['peak_source']}; --peak-tflops to set a peak)")
    if sc is not None:
        logged = r.get("sync_step_logged")
        p(f"  dispatch counter, step #{r['sync_step']}" + (" (a logging step)" if logged else
                                                          " (not a logging step)" if logged is False else "")
          + f": {r['ops_per_step']} aten ops, {r['syncs_per_step']} host syncs"
          + (" (CPU: counting what would sync on a GPU)" if r["device"] == "cpu" else ""))
        for site, n in sorted(r["sync_sites"].items(), key=lambda kv: (-kv[1], kv[0])):
            p(f"    {n:4d} x {site}")
        if r["host_only_reads"]:
            p(f"    (not syncs: {sum(r['host_only_reads'].values())} reads of host-side tensors: optimiser step "
              "counters, the batch before its transfer)")
        if verbose:
            p("    top ops: " + ", ".join(f"{k} {v}" for k, v in sc.op_counts.most_common(25)))
    if r.get("log_step") is not None:
        p(f"  dispatch counter, step #{r['log_step']} (a logging step: "
          f"{'yes' if r['log_step_logged'] else 'not confirmed'}): {r['log_step_ops']} aten ops, "
          f"{r['log_step_syncs']} host syncs")
        for site, n in sorted((r["log_step_sync_sites"] or {}).items(), key=lambda kv: (-kv[1], kv[0])):
            p(f"    {n:4d} x {site}")
    if r["cuda_sync_warnings"] is not None:
        p(f"  torch.cuda.set_sync_debug_mode('warn'), step #{r['sync_step'] + 1}: {r['cuda_sync_warnings']} "
          "synchronizing CUDA calls")
        for site, n in sorted((r["cuda_sync_sites"] or {}).items(), key=lambda kv: -kv[1]):
            p(f"    {n:4d} x {site}")


if __name__ == "__main__":
    main()
