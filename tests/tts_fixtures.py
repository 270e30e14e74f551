"""Tiny untrained TTS task checkpoints (AR, NAR, vocoder) sharing one seeded random demo codec."""
from __future__ import annotations

import torch


def _save_task_checkpoint(task, path):
    """What Trainer.save_checkpoint writes that load_from_checkpoint reads (weights + constructor arguments)."""
    import lightning as L

    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                  "pytorch-lightning_version": L.__version__}
    task.on_save_checkpoint(checkpoint)  # as Trainer.save_checkpoint: plain containers, the task's name
    torch.save(checkpoint, path)
    return path


def write_task_checkpoints(root):
    """Untrained ARTTSTask / VoiceboxTask / VocosTask checkpoints whose targets come from the same seeded random
    demo codec (as the *_demo recipes): the CLI takes the codec from the AR checkpoint."""
    from omegaconf import OmegaConf

    from flexitrain.models.tts.ar_tts import tiny_config
    from flexitrain.tasks.ar_tts import ARTTSTask
    from flexitrain.tasks.vocos import VocosTask
    from flexitrain.tasks.voicebox import VoiceboxTask
    from flexitrain.utils.config import compose

    # DictConfig arguments, as Hydra passes them (they end up in the checkpoint's hyper_parameters)
    codec_cfg = compose(["model=codec_tiny"], return_hydra_config=False).model
    teacher = OmegaConf.create({"random_init": True, "num_blocks": 1})
    torch.manual_seed(0)
    ar = ARTTSTask(OmegaConf.create({**tiny_config(), "text_token_size": 51866, "speech_token_size": 32768}),
                   targets=OmegaConf.create({"source": "codec", "codec_model": codec_cfg, "teacher": teacher}))
    nar = VoiceboxTask({"hidden_size": 32, "num_layers": 2, "num_heads": 2, "repa_layer_idx": 1, "use_repa": False},
                       codec=OmegaConf.create({"model": codec_cfg, "random_init": True}), teacher=teacher, use_repa=False)
    voc = VocosTask(model=OmegaConf.create({"dim": 32, "intermediate_dim": 64, "num_layers": 1}), sample_rate=16000)
    return {name: _save_task_checkpoint(task, root / f"{name}.ckpt") for name, task in
            (("ar", ar), ("nar", nar), ("vocoder", voc))}
