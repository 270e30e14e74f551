"""FlexiCodec-TTS stage 1: text -> FlexiCodec semantic tokens + per-token durations (plain PyTorch).

Port of the official ``TransformerLM`` (CosyVoice-1 LM with a duration head; design digest tts.md §1).
Parameter names equal the released ``artts.safetensors`` once its ``transformer_lm.`` prefix is removed.

LM sequence per item (teacher forcing), L text ids, T speech tokens s_1..s_T with durations d_1..d_T:

    position  0      1           2 .. L+1      L+2    L+3 .. L+T+2
    input     SOS    frame-rate  text-encoder  TASK   speech_emb(s_j) + duration_emb(d_{j-1}), d_0 = 0
    target    -      -           -             s_1    s_2 .. s_T, EOS

The hidden state where s_j is input also predicts d_j (duration head). Durations are classes 1..8
(12.5 Hz frames merged into a token); class 0 is the "no previous token" conditioning id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flexitrain.models.tts.ar_layers import (CausalRelPosEncoder, LayerCache, LMBlock, StaticKVCache, TextEncoderBlock,
                                             focal_loss)

IGNORE_ID = -1
SOS_EOS, TASK_ID = 0, 1


@dataclass
class ARTTSOutput:
    total_loss: torch.Tensor       # token CE + duration loss
    token_loss: torch.Tensor       # CE over speech targets and EOS, mean over targets
    duration_loss: torch.Tensor    # focal (or plain) CE over valid tokens
    accuracy: torch.Tensor         # next-token top-1 accuracy (incl. EOS)
    duration_accuracy: torch.Tensor
    lm_input: torch.Tensor         # [B, N, D], N = 3 + text.size(1) + speech.size(1); padding rows = -1
    lm_input_lengths: torch.Tensor  # [B] = 3 + L + T
    lm_output: torch.Tensor        # [B, N, D]
    text_encoder_out: torch.Tensor  # [B, L, D] before the affine layer
    duration_logits_padded: torch.Tensor  # [B, T, classes] at the speech positions
    speech_valid: torch.Tensor     # [B, T] bool: real tokens
    token_logits_padded: torch.Tensor  # [B, T + 1, V + 1] at the target positions (s_2 .. s_T, EOS)
    token_valid: torch.Tensor      # [B, T + 1] bool: real targets
    targets: torch.Tensor          # [B, N] with IGNORE_ID on text/padding

    # Packed views (item-major, as the official code's): boolean indexing waits for the device, so
    # the training step never asks for them; tests and analyses do.
    @property
    def duration_logits(self) -> torch.Tensor:  # [sum T, classes]
        return self.duration_logits_padded[self.speech_valid]

    @property
    def token_logits(self) -> torch.Tensor:  # [#targets, V + 1]
        return self.token_logits_padded[self.token_valid]


class ARTTSModel(nn.Module):
    """Text encoder (causal, 4 x 1024 in the release) + causal LM (16 x 1024) + token and duration heads."""

    def __init__(
        self,
        text_token_size: int = 51866,
        speech_token_size: int = 32768,
        text_encoder_dim: int = 1024,
        text_encoder_heads: int = 8,
        text_encoder_ffn: int = 3584,
        text_encoder_blocks: int = 4,
        llm_dim: int = 1024,
        llm_heads: int = 8,
        llm_ffn: int = 5376,
        llm_blocks: int = 16,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        spk_embed_dim: int = 192,
        duration_classes: int = 10,
        use_duration_conditioning: bool = True,
        framerate_options: list[float] | None = (0.86, 0.91),
        duration_loss: str = "focal",
        focal_alpha: float = 1.0,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if duration_loss not in ("focal", "ce"):
            raise ValueError(f"duration_loss must be 'focal' or 'ce', got {duration_loss!r}")
        self.speech_token_size = speech_token_size
        self.eos_id = speech_token_size
        self.llm_dim = llm_dim
        self.duration_classes = duration_classes
        self.use_duration_conditioning = use_duration_conditioning
        self.framerate_options = [float(x) for x in framerate_options] if framerate_options else []
        self.duration_loss_type, self.focal_alpha, self.focal_gamma = duration_loss, focal_alpha, focal_gamma

        self.text_embedding = nn.Embedding(text_token_size, text_encoder_dim)
        self.text_encoder = CausalRelPosEncoder(
            TextEncoderBlock, text_encoder_dim, text_encoder_heads, text_encoder_ffn, text_encoder_blocks,
            "swish", dropout_rate, positional_dropout_rate, attention_dropout_rate)
        self.text_encoder_affine_layer = nn.Linear(text_encoder_dim, llm_dim)
        self.llm_embedding = nn.Embedding(2, llm_dim)  # SOS/EOS, TASK
        self.llm = CausalRelPosEncoder(
            LMBlock, llm_dim, llm_heads, llm_ffn, llm_blocks,
            "relu", dropout_rate, positional_dropout_rate, attention_dropout_rate)
        self.llm_decoder = nn.Linear(llm_dim, speech_token_size + 1)
        self.speech_embedding = nn.Embedding(speech_token_size, llm_dim)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, llm_dim)  # unused; kept for the released key set
        if self.framerate_options:
            self.framerate_embed_affine_layer = nn.Linear(len(self.framerate_options), llm_dim)
        self.duration_decoder = nn.Linear(llm_dim, duration_classes)
        if use_duration_conditioning:
            self.duration_embedding = nn.Embedding(duration_classes + 1, llm_dim)

    # ---- pieces shared by training and decoding -------------------------------------------------------------
    def framerate_index(self, threshold: float) -> int:
        for i, option in enumerate(self.framerate_options):
            if math.isclose(float(threshold), option, abs_tol=1e-6):
                return i
        raise ValueError(f"merging threshold {threshold} is not one of this model's frame-rate options "
                         f"{self.framerate_options}")

    def framerate_slot(self, framerate: float | torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """[B, 1, D]: the affine one-hot frame-rate embedding; zeros if the model has no options or
        ``framerate`` is None (what the original does when it gets no frame rate)."""
        if framerate is None or not self.framerate_options:
            return torch.zeros(batch, 1, self.llm_dim, device=device)
        if isinstance(framerate, torch.Tensor) and framerate.dim() > 0:  # per-item thresholds
            index = torch.tensor([self.framerate_index(float(f)) for f in framerate.tolist()], device=device)
        else:
            index = torch.full((batch,), self.framerate_index(float(framerate)), device=device)
        # eye()[index] rather than F.one_hot, which checks the index range on the host (a device sync).
        one_hot = torch.eye(len(self.framerate_options), device=device)[index]
        return self.framerate_embed_affine_layer(one_hot).unsqueeze(1)

    def encode_text(self, text: torch.Tensor, text_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, L] -> (encoder output before the affine layer, after it), both [B, L, D]."""
        if self.checks_in_forward and text.device.type == "cpu":  # on an accelerator the check would wait for it
            self.check_text(text)
        encoded = self.text_encoder(self.text_embedding(text), text_lengths)
        return encoded, self.text_encoder_affine_layer(encoded)

    def speech_inputs(self, tokens: torch.Tensor, previous_durations: torch.Tensor | None) -> torch.Tensor:
        """speech_emb(s_j) + duration_emb(d_{j-1}) for [B, T] tokens and already right-shifted durations."""
        emb = self.speech_embedding(tokens)
        if self.use_duration_conditioning and previous_durations is not None:
            emb = emb + self.duration_embedding(previous_durations)
        return emb

    # ---- input checks: free on host tensors, a device sync each on a GPU, so forward runs them on host inputs
    # only; a training task turns them off (checks_in_forward) and runs them on the batch before transfer.
    checks_in_forward = True

    def check_text(self, text: torch.Tensor) -> None:
        if text.numel() and (int(text.max()) >= self.text_embedding.num_embeddings or int(text.min()) < 0):
            raise ValueError(f"text ids must lie in [0, {self.text_embedding.num_embeddings}), "
                             f"got [{int(text.min())}, {int(text.max())}]")

    def check_targets(self, speech: torch.Tensor, speech_lengths: torch.Tensor, durations: torch.Tensor) -> None:
        valid = torch.arange(speech.size(1), device=speech.device) < speech_lengths.to(speech.device).unsqueeze(1)
        s, d = speech[valid], durations[valid]
        if s.numel() and (int(s.min()) < 0 or int(s.max()) >= self.speech_token_size):
            raise ValueError(f"speech tokens must lie in [0, {self.speech_token_size}), "
                             f"got [{int(s.min())}, {int(s.max())}]")
        if d.numel() and (int(d.min()) < 1 or int(d.max()) >= self.duration_classes):
            raise ValueError(f"durations of valid tokens must lie in [1, {self.duration_classes - 1}], "
                             f"got [{int(d.min())}, {int(d.max())}]")

    # ---- teacher forcing ------------------------------------------------------------------------------------
    def forward(self, text: torch.Tensor, text_lengths: torch.Tensor, speech: torch.Tensor,
                speech_lengths: torch.Tensor, durations: torch.Tensor,
                framerate: float | torch.Tensor | None = None) -> ARTTSOutput:
        """text [B, L] ids (incl. the language token), speech [B, T] codes, durations [B, T] in 1..classes-1;
        ``framerate`` is the merging threshold of these targets (one for the batch or one per item)."""
        b, device = text.size(0), text.device
        text_lengths, speech_lengths = text_lengths.to(device), speech_lengths.to(device)
        if self.checks_in_forward and speech.device.type == "cpu":
            self.check_targets(speech, speech_lengths, durations)
        num_text, num_speech = text.size(1), speech.size(1)
        speech_valid = torch.arange(num_speech, device=device) < speech_lengths.unsqueeze(1)

        text_out, text_emb = self.encode_text(text, text_lengths)
        previous = F.pad(durations[:, :-1], (1, 0)) * speech_valid  # d_{j-1}, 0 at j=1 and on padding
        speech_emb = self.speech_inputs(speech, previous)

        # Gather every position's input from its piece: fixed shapes, no boolean indexing (which waits
        # for the device to count), N = 3 + L + T from the padded sizes, not from the lengths' maximum.
        lengths = 3 + text_lengths + speech_lengths
        n = 3 + num_text + num_speech
        dtype = text_emb.dtype  # under autocast the pieces come in several dtypes: one for the sequence
        pos = torch.arange(n, device=device).expand(b, n)
        text_idx = pos - 2
        speech_idx = pos - (3 + text_lengths).unsqueeze(1)
        is_text = (text_idx >= 0) & (text_idx < text_lengths.unsqueeze(1))
        is_speech = (speech_idx >= 0) & (speech_idx < speech_lengths.unsqueeze(1))
        pad = torch.full((), float(IGNORE_ID), device=device, dtype=dtype)
        lm_input = torch.where(is_text.unsqueeze(-1), _take(text_emb.to(dtype), text_idx), pad)
        lm_input = torch.where(is_speech.unsqueeze(-1), _take(speech_emb.to(dtype), speech_idx), lm_input)
        lm_input = torch.where((speech_idx == -1).unsqueeze(-1), self.llm_embedding.weight[TASK_ID].to(dtype), lm_input)
        lm_input = torch.cat([self.llm_embedding.weight[SOS_EOS].to(dtype).expand(b, 1, -1),
                              self.framerate_slot(framerate, b, device).to(dtype), lm_input[:, 2:]], dim=1)

        # Targets: s_{j+1} at the position of s_j (TASK predicts s_1), EOS after the last token.
        target_idx = speech_idx + 1  # j for the position that predicts s_{j+1} (0-based)
        targets = torch.where(target_idx < speech_lengths.unsqueeze(1), _take(speech, target_idx), self.eos_id)
        targets = torch.where((target_idx >= 0) & (target_idx <= speech_lengths.unsqueeze(1)), targets, IGNORE_ID)

        lm_output = self.llm(lm_input, lengths)
        # The T + 1 positions that predict s_1 .. s_T, EOS, and the T that predict d_1 .. d_T, per item.
        steps = torch.arange(num_speech + 1, device=device)
        predict_pos = (2 + text_lengths).unsqueeze(1) + steps
        token_valid = steps <= speech_lengths.unsqueeze(1)
        token_logits = self.llm_decoder(_take(lm_output, predict_pos))
        token_targets = torch.where(token_valid, _take(targets, predict_pos), IGNORE_ID)
        token_loss = F.cross_entropy(token_logits.flatten(0, 1), token_targets.flatten(), ignore_index=IGNORE_ID)
        accuracy = _masked_accuracy(token_logits, token_targets, token_valid)

        duration_logits = self.duration_decoder(_take(lm_output, predict_pos[:, 1:]))
        duration_targets = torch.where(speech_valid, durations, IGNORE_ID)
        if self.duration_loss_type == "focal":
            duration_loss = focal_loss(duration_logits.flatten(0, 1), duration_targets.flatten(), self.focal_alpha,
                                       self.focal_gamma, ignore_index=IGNORE_ID)
        else:
            duration_loss = F.cross_entropy(duration_logits.flatten(0, 1), duration_targets.flatten(),
                                            ignore_index=IGNORE_ID)
        duration_accuracy = _masked_accuracy(duration_logits, duration_targets, speech_valid)
        return ARTTSOutput(token_loss + duration_loss, token_loss, duration_loss, accuracy.detach(),
                           duration_accuracy.detach(), lm_input, lengths, lm_output, text_out, duration_logits,
                           speech_valid, token_logits, token_valid, targets)

    # ---- incremental decoding (used by sampling.py) ---------------------------------------------------------
    def decode_prefix(self, text: torch.Tensor, framerate: float | None, prompt_tokens: torch.Tensor | None = None,
                      prompt_durations: torch.Tensor | None = None) -> torch.Tensor:
        """LM input of the decoding prefix for one utterance: [1, 3 + L + P, D].
        text [1, L] already holds prompt text + target text; prompt_tokens/durations [1, P]."""
        if text.size(0) != 1:
            raise ValueError("decode_prefix handles one utterance at a time (batch size 1)")
        device = text.device
        _, text_emb = self.encode_text(text, torch.tensor([text.size(1)], device=device))
        pieces = [self.llm_embedding.weight[SOS_EOS].view(1, 1, -1), self.framerate_slot(framerate, 1, device),
                  text_emb, self.llm_embedding.weight[TASK_ID].view(1, 1, -1)]
        pieces = [p.to(text_emb.dtype) for p in pieces]
        if prompt_tokens is not None and prompt_tokens.numel():
            previous = None
            if self.use_duration_conditioning:
                if prompt_durations is None or prompt_durations.shape != prompt_tokens.shape:
                    raise ValueError("prompt_durations [1, P] are required with duration conditioning")
                previous = F.pad(prompt_durations[:, :-1], (1, 0))
            pieces.append(self.speech_inputs(prompt_tokens, previous).to(text_emb.dtype))
        return torch.cat(pieces, dim=1)

    def step(self, lm_input: torch.Tensor, cache: list[LayerCache] | None
             ) -> tuple[torch.Tensor, list[LayerCache]]:
        """Run new LM positions against the cache -> (hidden of the last position [B, D], new cache)."""
        out, cache = self.llm.forward_chunk(lm_input, cache)
        return out[:, -1], cache

    def static_step(self, lm_input: torch.Tensor, cache: StaticKVCache, position: torch.Tensor,
                    window: int | None = None) -> torch.Tensor:
        """One new LM position [B, 1, D] at column ``position`` ([1] long tensor) of a static-shape cache (written
        in place) -> its hidden state [B, D]; the same numbers as ``step`` up to summation order (a few ulp)."""
        return self.llm.forward_static(lm_input, cache, position, window)[:, -1]


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, N, ...] at per-row positions index [B, M] (clamped into range; callers mask) -> [B, M, ...]."""
    index = index.clamp(0, max(values.size(1) - 1, 0))
    if values.dim() == 2:
        return values.gather(1, index)
    return values.gather(1, index.unsqueeze(-1).expand(-1, -1, values.size(-1)))


def _masked_accuracy(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    hits = (logits.argmax(-1) == targets) & valid
    return hits.sum().float() / valid.sum().clamp(min=1).float()


def released_config() -> dict:
    """Constructor arguments of the released artts.safetensors (prepare_artts_model defaults)."""
    return dict(text_token_size=51866, speech_token_size=32768, text_encoder_dim=1024, text_encoder_heads=8,
                text_encoder_ffn=3584, text_encoder_blocks=4, llm_dim=1024, llm_heads=8, llm_ffn=5376,
                llm_blocks=16, spk_embed_dim=192, duration_classes=10, framerate_options=[0.86, 0.91])


def tiny_config() -> dict:
    """The configuration of ../shared/reference/ar_tts_tiny (d=64, 2+2 blocks, reduced vocabularies)."""
    return dict(text_token_size=4096, speech_token_size=1024, text_encoder_dim=64, text_encoder_heads=4,
                text_encoder_ffn=96, text_encoder_blocks=2, llm_dim=64, llm_heads=4, llm_ffn=160, llm_blocks=2,
                spk_embed_dim=16, duration_classes=10, framerate_options=[0.86, 0.91])
