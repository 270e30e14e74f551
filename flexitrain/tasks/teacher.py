"""Build the frozen semantic teacher from the task's `teacher` config."""
from __future__ import annotations

import logging

import torch

from flexitrain.models.sensevoice import SenseVoiceTeacher

log = logging.getLogger(__name__)

# SenseVoiceSmall's encoder at its real widths; `num_blocks` is the only knob a random teacher changes.
SENSEVOICE_SMALL_ENCODER = dict(output_size=512, attention_heads=4, linear_units=2048, num_blocks=50,
                                tp_blocks=0, kernel_size=11, sanm_shfit=0)


def build_teacher(cfg: dict) -> SenseVoiceTeacher:
    """`model_dir`: a local SenseVoiceSmall (strictly loaded). `random_init: true`: a seeded random teacher
    for demos and tests, whose features only reflect acoustic similarity. Neither set: a clear error."""
    cfg = dict(cfg or {})
    dither = float(cfg.get("dither", 0.0))
    if cfg.get("model_dir"):
        return SenseVoiceTeacher.from_pretrained(cfg["model_dir"], dither=dither, config_key="task.teacher.model_dir")
    if not cfg.get("random_init"):
        raise ValueError("task.teacher.model_dir is not set: point it (or SENSEVOICE_DIR) at a local SenseVoiceSmall "
                         "directory (config.yaml, model.pt, am.mvn), or set task.teacher.random_init=true for a "
                         "random teacher (demo/tests only)")
    log.warning("using a RANDOMLY initialised SenseVoice teacher (%s blocks): demo/test use only",
                cfg.get("num_blocks", 50))
    state = torch.random.get_rng_state()
    torch.manual_seed(int(cfg.get("seed", 0)))
    teacher = SenseVoiceTeacher({**SENSEVOICE_SMALL_ENCODER, "num_blocks": int(cfg.get("num_blocks", 50))},
                                dither=dither)
    torch.random.set_rng_state(state)  # building the teacher must not shift the training RNG stream
    return teacher
