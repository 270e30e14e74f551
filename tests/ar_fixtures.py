"""Shared pieces for AR-TTS model tests: a tiny seeded model and a left-padded batch of sequences."""
from __future__ import annotations

import torch

from flexitrain.models.tts.ar_tts import ARTTSModel, tiny_config


def tiny_model(seed=0, eos_bias=0.0, **kw):
    torch.manual_seed(seed)
    model = ARTTSModel(**{**tiny_config(), "text_token_size": 300, "speech_token_size": 50, **kw})
    with torch.no_grad():  # a random model rarely says EOS: nudge it so that some utterances stop by EOS
        model.llm_decoder.bias[model.eos_id] += eos_bias
    return model.eval()


def left_padded(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, n_i, d]`` sequences -> ``[B, max n, d]`` with each row's zeros on the left, and the offsets
    (padding lengths) that `forward_chunk` / `StaticKVCache` take."""
    total = max(s.size(1) for s in seqs)
    padded = torch.zeros(len(seqs), total, seqs[0].size(2))
    for i, s in enumerate(seqs):
        padded[i, total - s.size(1):] = s[0]
    return padded, torch.tensor([total - s.size(1) for s in seqs])
