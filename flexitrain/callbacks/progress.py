"""Rich progress bar whose description fits step-limited training."""
from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar as _LightningRichProgressBar


class RichProgressBar(_LightningRichProgressBar):
    """Lightning's RichProgressBar, but "Epoch 2 · 300 steps" when training is limited by steps instead of
    "Epoch 2/-2" (max_epochs = -1: no epoch limit). Same class name, so toggles and logs that name it still apply."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch}"
        if trainer.max_steps is not None and trainer.max_steps > 0:
            text += f" · {trainer.max_steps} steps"
        if len(self.validation_description) > len(text):
            text = f"{text:{len(self.validation_description)}}"
        return text
