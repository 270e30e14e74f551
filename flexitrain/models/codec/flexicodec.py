"""FlexiCodec: dynamic-frame-rate speech codec (a faithful port of amphionspace/FlexiCodec).

Constructor arguments and state-dict keys are the official ones. Two ways to run it:

- ``use_padding_mask=False`` reproduces the official computation exactly (no attention masks,
  batch-level interpolation of teacher features); the parity tool uses it.
- ``use_padding_mask=True`` (default of the public API) masks padding everywhere (DAC convs,
  ConvNeXt, aggregators, bottleneck), so a batched item gives the same codes as the item alone,
  and runs the DAC in a faster memory layout.

Host syncs: inference (``encode`` / ``decode``) makes a few per call (not per item): the number of
tokens G (tensor sizes depend on it), input checks, and "is the batch ragged?" checks that skip
masking work when every item has the same length. The masked training ``forward`` makes none: the
group axis is padded to T (``static_groups``), padding is always masked (all-ones masks for full
items), and its one input check is a device-side assert.

Data flow (16 kHz, hop 1280 → 12.5 Hz frames): DAC encoder → acoustic frames; teacher features
(SenseVoice, 16.67 Hz) → interpolated to 12.5 Hz; neighbour-similarity merging → groups;
QueryTokenAggregators → tokens; semantic: ConvNeXt → FSQ → ConvNeXt; acoustic: RVQ on
(acoustic − decoded semantic); decoding copies tokens back to frames → bottleneck transformer →
DAC decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .aggregator import QueryTokenAggregator
from .convnext import ConvNeXtBlock
from .dac import DAC
from .fsq import FSQWrapper
from .layers import WNConv1d, clear_folded_weights
from .merging import (Grouping, downsample_features, downsample_features_per_item, downsample_lengths,
                      expand_groups, frame_to_group_from_lengths, group_frames, mean_pool)
from .transformer import ProjectedTransformer

_EXTRA_ARGS = ("semantic_teacher",)


def check_host_lengths(lengths, low: int, high: int, message: str) -> None:
    """Raise ``message`` unless every length lies in [low, high]. Only ever given host data (a list or a CPU
    tensor), so it never waits for a device; the sync counter (utils/dispatch_count.py) knows it by name."""
    lengths = torch.as_tensor(lengths).long()
    if lengths.numel() and (int(lengths.min()) < low or int(lengths.max()) > high):
        raise ValueError(f"{message}, got {lengths.tolist()}")


@dataclass
class CodecTokens:
    """Output of :meth:`FlexiCodec.encode` (input to :meth:`FlexiCodec.decode`).

    Groups ``g >= num_tokens[b]`` are padding: their codes are 0 and ``token_lengths`` is 0.
    """

    semantic_codes: torch.Tensor  # [B, G] int64 FSQ index (0..32767); [B, C, G] for multi-codebook FSQ
    acoustic_codes: Optional[torch.Tensor]  # [B, num_quantizers-1, G] int64 RVQ codes; None if num_quantizers == 1
    token_lengths: torch.Tensor  # [B, G] int64, 12.5 Hz frames covered by each token (0 = padding)
    num_tokens: torch.Tensor  # [B] int64 valid tokens per item
    num_frames: torch.Tensor  # [B] int64 12.5 Hz frames per item (= token_lengths.sum(1))
    num_samples: torch.Tensor  # [B] int64 input length in samples at ``sample_rate``
    sample_rate: int  # sample rate of the input waveform (decode returns audio at this rate)
    frame_rate: torch.Tensor  # [B] float tokens per second of input audio
    bitrate: torch.Tensor  # [B] float bits/s of the codes (FSQ bits + RVQ bits per token; durations excluded)
    alignment: Optional["TokenAlignment"] = None  # only with ``encode(..., return_alignment=True)``


@dataclass
class TokenAlignment:
    """How :meth:`FlexiCodec.encode` merged 12.5 Hz frames into tokens (``return_alignment=True``).

    Token g of item b covers frames ``[token_starts[b, g], token_starts[b, g] + token_lengths[b, g])``; the valid
    tokens (``g < num_tokens[b]``) tile ``[0, num_frames[b])``. Padding tokens are empty spans at ``num_frames``.
    Merge rule: frame t > 0 starts a token iff ``similarity[b, t-1] <= threshold[b]``, or the
    ``max_tokens_per_group`` cap cuts the run (every cap frames from the run's first frame).
    """

    token_starts: torch.Tensor  # [B, G] int64 first frame of each token
    token_lengths: torch.Tensor  # [B, G] int64 frames per token (0 = padding), same as CodecTokens.token_lengths
    similarity: torch.Tensor  # [B, T-1] float cosine similarity of frames t-1 and t (0 where either is padding)
    threshold: torch.Tensor  # [B] float τ the merge used (2.0 for fixed-rate models: every frame is a token)
    num_frames: torch.Tensor  # [B] int64 valid frames per item
    max_tokens_per_group: Optional[int]  # run-length cap (None: no cap)
    frame_rate: float  # frames per second of the frame grid (12.5 for the release)

    def spans(self, b: int) -> list[tuple[int, int]]:
        """``(start frame, length)`` of item ``b``'s valid tokens, in order (for plotting)."""
        valid = self.token_lengths[b] > 0
        return list(zip(self.token_starts[b][valid].tolist(), self.token_lengths[b][valid].tolist()))


@dataclass
class CodecAudio:
    """Output of :meth:`FlexiCodec.decode`."""

    audio: torch.Tensor  # [B, 1, T] waveform, zero past each item's length
    lengths: torch.Tensor  # [B] int64 valid samples per item (= the encoded input lengths)
    sample_rate: int


@dataclass
class CodecForwardOutput:
    """Output of :meth:`FlexiCodec.forward` (training / teacher-forced reconstruction).

    Shapes: T = 12.5 Hz frames, G = tokens (groups). Loss tensors are scalars.
    """

    audio: torch.Tensor  # [B, 1, N] reconstruction, cropped / zero-padded to the input length
    commitment_loss: torch.Tensor  # Σ_stages mean_b(mask·MSE(z_e, sg(z_q))) of the acoustic RVQ (0 if bypassed)
    codebook_loss: torch.Tensor  # Σ_stages mean_b(mask·MSE(z_q, sg(z_e))) (0 if bypassed)
    semantic_aggregated: torch.Tensor  # [B, 512, G] semantic aggregator output (ConvNeXt/FSQ input; official training distill target)
    semantic_decoded: torch.Tensor  # [B, 512, G] ConvNeXt-decoder output after FSQ (the distillation prediction)
    semantic_target: torch.Tensor  # [B, 512, G] mean-pooled 12.5 Hz teacher features per token, detached (release-code target)
    semantic_frames: torch.Tensor  # [B, 512, T] 12.5 Hz teacher features, detached (REPA target part)
    acoustic_frames: torch.Tensor  # [B, latent, T] DAC encoder output (trimmed to T)
    bottleneck_output: torch.Tensor  # [B, latent, T] bottleneck transformer output (DAC decoder input)
    semantic_codes: torch.Tensor  # [B, 1, G] int32 FSQ codes
    acoustic_codes: Optional[torch.Tensor]  # [B, n, G] int64 RVQ codes (all stages that ran), None if bypassed
    token_lengths: torch.Tensor  # [B, G] int64 frames per token (0 = padding)
    group_mask: torch.Tensor  # [B, G] bool valid tokens
    frame_mask: torch.Tensor  # [B, T] bool valid frames
    num_tokens: torch.Tensor  # [B] int64
    threshold: torch.Tensor  # [B] float τ used for each item
    n_quantizers: Optional[torch.Tensor]  # [B] acoustic RVQ stages kept per item (after dropout), None if bypassed
    bypassed_quantize: bool  # True when the acoustic RVQ was skipped (semantic-only reconstruction)


def _as_batch_audio(wav: torch.Tensor) -> torch.Tensor:
    if wav.dim() == 1:
        wav = wav[None, None]
    elif wav.dim() == 2:
        wav = wav[:, None]
    if wav.dim() != 3 or wav.shape[1] != 1:
        raise ValueError(f"expected mono audio [N], [B, N] or [B, 1, N], got shape {tuple(wav.shape)}")
    return wav.float()


def _no_autocast(x: torch.Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def teacher_frames(num_samples: torch.Tensor) -> torch.Tensor:
    """SenseVoice LFR frames for 16 kHz lengths: ceil(F / 6), F = 1 + (N - 400) // 160 kaldi frames
    (1 below 400 samples, where the fbank window shrinks)."""
    kaldi = 1 + torch.div(num_samples - 400, 160, rounding_mode="floor")
    return torch.div(kaldi.clamp(min=1) + 5, 6, rounding_mode="floor")


def resample(wav: torch.Tensor, lengths: torch.Tensor, orig_sr: int, new_sr: int):
    """Resample ``[B, 1, N]`` audio with soxr (batch as channels); returns ``(audio, lengths)``."""
    if orig_sr == new_sr:
        return wav, lengths
    import numpy as np
    import soxr

    keep_in = torch.arange(wav.shape[-1], device=wav.device) < lengths.to(wav.device).unsqueeze(1)
    x = np.ascontiguousarray((wav[:, 0] * keep_in).detach().float().cpu().numpy().T)  # [N, B], zero-padded
    y = soxr.resample(x, orig_sr, new_sr, quality="HQ")
    if y.ndim == 1:
        y = y[:, None]
    out = torch.from_numpy(np.ascontiguousarray(y.T)).to(wav.device)[:, None]
    new_lengths = torch.round(lengths.double() * new_sr / orig_sr).long().clamp(max=out.shape[-1])
    keep = torch.arange(out.shape[-1], device=out.device) < new_lengths.to(out.device).unsqueeze(1)
    return out * keep.unsqueeze(1), new_lengths.to(lengths.device)


class FlexiCodec(nn.Module):
    """The FlexiCodec codec. Arguments are the official ones (``model_config.yaml`` maps 1:1).

    Extra argument: ``semantic_teacher`` — a frozen module called as
    ``teacher(wav [B, N] at 16 kHz, lengths [B]) -> (features [B, 512, T_sem], lengths [B])``
    (SenseVoice ``hidden_out`` at 16.67 Hz). It is registered as ``semantic_model`` (the official
    key prefix) and is only needed when teacher features are not passed in.
    Unused official arguments (``semantic_model_path``, ``semantic_codebook_size``, ...) are kept in
    ``self.config`` for round-tripping; nothing is downloaded.
    """

    def __init__(
        self,
        encoder_dim: int = 64,
        encoder_rates: list[int] = (2, 4, 8, 8),
        latent_dim: int | None = None,
        decoder_dim: int = 1536,
        decoder_rates: list[int] = (8, 8, 4, 2),
        n_codebooks: int = 9,
        codebook_size: int = 1024,
        semantic_codebook_size: int = 16384,
        codebook_dim: int | list = 8,
        semantic_codebook_dim=8,
        fsq_config: dict | None = None,
        quantizer_dropout: float = True,
        sample_rate: int = 24000,
        distill_projection_out_dim=1024,
        convnext_dim=768,
        convnext_layers=4,
        decode_semantic_for_codec=True,
        is_causal=True,
        semantic_downsample_factor=2,
        semantic_encoder=None,
        semantic_decoder=None,
        ssl_dim=1024,
        semantic_model_path="./SenseVoiceSmall",
        lambda_distill_loss=15.0,
        use_similarity_alignment: bool = False,
        similarity_threshold=None,
        use_dynamic_similarity_threshold: bool = False,
        similarity_threshold_lower: float = 0.8,
        similarity_threshold_upper: float = 1.0,
        skip_normalize=True,
        max_tokens_per_group: int | None = 8,
        semantic_model_type: str = "sensevoice",
        sensevoice_prepend_inputs: bool = True,
        use_bottleneck_transformer: bool = False,
        bottleneck_transformer_config: dict | None = None,
        transformer_num_layers: int = 6,
        transformer_dim: int = 512,
        transformer_dim_feedforward: int = 2048,
        transformer_num_heads: int = 8,
        transformer_causal: bool = False,
        transformer_context_frames: int = 24,
        use_query_token_aggregator: bool = False,
        agg_transformer_num_layers: int = 6,
        agg_transformer_dim: int = 512,
        agg_transformer_num_heads: int = 8,
        agg_transformer_dim_feedforward: int = 2048,
        agg_transformer_causal: bool = False,
        agg_use_mean_pooling_init: bool = True,
        agg_transformer_context_frames: int | None = None,
        sensevoice_sim_layer_idx=None,
        sensevoice_semantic_layer_idx=None,
        semantic_teacher: nn.Module | None = None,
    ):
        super().__init__()
        self.config = {k: v for k, v in locals().items()
                       if k not in ("self", "__class__") and k not in _EXTRA_ARGS}
        for k in ("encoder_rates", "decoder_rates"):
            self.config[k] = list(self.config[k])
        if semantic_encoder is not None or semantic_decoder is not None:
            raise NotImplementedError("custom semantic_encoder / semantic_decoder modules are not supported")
        if semantic_model_type not in ("sensevoice", "external"):
            raise NotImplementedError(f"semantic_model_type={semantic_model_type!r}: 'sensevoice' or 'external' "
                                      "(ssl_dim-wide features of any teacher, flexitrain.tasks.teacher)")
        if sensevoice_semantic_layer_idx is not None or sensevoice_sim_layer_idx is not None:
            raise NotImplementedError("SenseVoice layer selection is not supported (the release uses hidden_out)")
        if semantic_model_type == "sensevoice":
            ssl_dim = 512  # official: forced for SenseVoice
        if use_similarity_alignment:
            if not use_dynamic_similarity_threshold and similarity_threshold is None:
                raise ValueError("similarity_threshold must be set when use_dynamic_similarity_threshold=False")
            if use_dynamic_similarity_threshold and not similarity_threshold_lower < similarity_threshold_upper:
                raise ValueError("similarity_threshold_lower must be less than similarity_threshold_upper")
        if agg_transformer_context_frames is None:
            agg_transformer_context_frames = transformer_context_frames

        self.sample_rate = sample_rate
        self.semantic_downsample_factor = semantic_downsample_factor
        self.lambda_distill_loss = lambda_distill_loss
        self.use_similarity_alignment = use_similarity_alignment
        self.similarity_threshold = similarity_threshold
        self.use_dynamic_similarity_threshold = use_dynamic_similarity_threshold
        self.similarity_threshold_lower = similarity_threshold_lower
        self.similarity_threshold_upper = similarity_threshold_upper
        self.max_tokens_per_group = max_tokens_per_group if (max_tokens_per_group or 0) > 0 else None
        self.use_query_token_aggregator = use_query_token_aggregator
        self.decode_semantic_for_codec = decode_semantic_for_codec
        self.ssl_dim = ssl_dim
        # Inference (no grad) runs the DAC convs in the [B, C, 1, T] channels-last layout on both
        # paths: same math, faster with oneDNN (no layout reorders, 1x1 conv + residual as one GEMM
        # into the input, Snakes in cache-sized blocks / in place); rounding differs (~1e-7, codes
        # identical on the reference cases). Training forward keeps [B, C, T] on the official path.
        self.fast_conv_layout = True

        # Registration order follows the official module (state-dict key order).
        resolved_latent = latent_dim if latent_dim is not None else encoder_dim * 2 ** len(encoder_rates)
        if use_bottleneck_transformer and transformer_num_layers > 0:
            self.bottleneck_transformer = ProjectedTransformer(
                input_dimension=resolved_latent, output_dimensions=[resolved_latent], d_model=transformer_dim,
                conv_layout=True, num_heads=transformer_num_heads, num_layers=transformer_num_layers,
                dim_feedforward=transformer_dim_feedforward, causal=transformer_causal,
                context=transformer_context_frames, layer_scale=0.01, norm="layer_norm",
                positional_embedding="rope", max_period=10000)
        else:
            self.bottleneck_transformer = nn.Identity()
        self.semantic_model = semantic_teacher
        if semantic_teacher is not None:
            for p in semantic_teacher.parameters():
                p.requires_grad_(False)
        self.register_buffer("semantic_mean", torch.zeros(1))
        self.register_buffer("semantic_std", torch.ones(1))
        self.dac = DAC(encoder_dim, encoder_rates, latent_dim, decoder_dim, decoder_rates, n_codebooks,
                       codebook_size, codebook_dim, quantizer_dropout, sample_rate)
        self.latent_dim = self.dac.latent_dim
        self.convnext_encoder = nn.Sequential(
            WNConv1d(ssl_dim, convnext_dim, kernel_size=1),
            *[ConvNeXtBlock(convnext_dim, 2048, is_causal=is_causal) for _ in range(convnext_layers)])
        self.semantic_vq = FSQWrapper(input_dim=convnext_dim, **dict(fsq_config or {}))
        self.convnext_decoder = nn.Sequential(
            *[ConvNeXtBlock(convnext_dim, 2048, is_causal=is_causal) for _ in range(convnext_layers)],
            WNConv1d(convnext_dim, self.latent_dim, kernel_size=1))
        if use_query_token_aggregator:
            self.semantic_aggregator = QueryTokenAggregator(
                dim=agg_transformer_dim, in_out_dim=ssl_dim, num_heads=agg_transformer_num_heads,
                num_layers=agg_transformer_num_layers, dim_feedforward=agg_transformer_dim_feedforward,
                causal=agg_transformer_causal, use_mean_pooling_init=agg_use_mean_pooling_init,
                context_frames=transformer_context_frames)
            self.acoustic_aggregator = QueryTokenAggregator(
                dim=self.latent_dim, in_out_dim=self.latent_dim, num_heads=agg_transformer_num_heads,
                num_layers=agg_transformer_num_layers, dim_feedforward=agg_transformer_dim_feedforward,
                causal=agg_transformer_causal, use_mean_pooling_init=agg_use_mean_pooling_init,
                context_frames=agg_transformer_context_frames)

    def train(self, mode: bool = True) -> "FlexiCodec":
        # Folded weight-norm caches serve inference only; a mode switch (e.g. into validation) starts fresh.
        clear_folded_weights(self)
        return super().train(mode)

    # ------------------------------------------------------------------ properties / loading
    @property
    def hop_length(self) -> int:
        return self.dac.hop_length

    @property
    def frame_rate(self) -> float:
        """Frame rate before merging (12.5 Hz for the release)."""
        return self.sample_rate / self.hop_length

    @property
    def n_codebooks(self) -> int:
        return self.dac.quantizer.n_codebooks

    def codec_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict without the frozen teacher (``semantic_model.*``): what checkpoints store."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("semantic_model.")}

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a checkpoint directory (``config.yaml`` + ``model.safetensors``, teacher excluded)."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path, semantic_teacher: nn.Module | None = None,
                        map_location: str | torch.device = "cpu", what: str = "codec directory") -> "FlexiCodec":
        """Load a local flexitrain checkpoint directory (``config.yaml`` + ``model.safetensors``). Nothing downloads,
        nothing is unpickled; a bad directory or file raises one error naming it and what is wrong."""
        from .checkpoint import load_pretrained

        return load_pretrained(path, semantic_teacher=semantic_teacher, map_location=map_location, what=what)

    # ------------------------------------------------------------------ building blocks
    def _threshold(self, threshold, B: int, device) -> torch.Tensor:
        if threshold is None:
            if self.training and self.use_dynamic_similarity_threshold:
                lo, hi = self.similarity_threshold_lower, self.similarity_threshold_upper
                return torch.rand(B, device=device) * (hi - lo) + lo
            if self.similarity_threshold is None:
                raise ValueError("no threshold given and the config has no similarity_threshold")
            threshold = self.similarity_threshold
        if torch.is_tensor(threshold):
            return threshold.to(device=device, dtype=torch.float32).expand(B) if threshold.dim() == 0 \
                else threshold.to(device=device, dtype=torch.float32)
        return torch.full((B,), float(threshold), device=device)

    def _teacher_features(self, audio: torch.Tensor, lengths: torch.Tensor):
        if self.semantic_model is None:
            raise ValueError("no semantic_features given and the model has no semantic_teacher")
        was_training = self.semantic_model.training
        self.semantic_model.eval()
        with torch.no_grad():
            out = self.semantic_model(audio[:, 0], lengths)
        self.semantic_model.train(was_training)
        feats, feat_lens = out if isinstance(out, (tuple, list)) else (out, None)
        if feats.shape[1] != self.ssl_dim:
            raise ValueError(f"teacher features must be [B, {self.ssl_dim}, T], got {tuple(feats.shape)}")
        return feats.float(), feat_lens

    def encode_frames(self, audio: torch.Tensor, semantic: torch.Tensor, audio_lengths: torch.Tensor | None = None,
                      semantic_lengths: torch.Tensor | None = None, use_padding_mask: bool = True,
                      host_checks: bool = True):
        """12.5 Hz acoustic and semantic frames.

        audio ``[B, 1, N]`` at the codec rate; semantic ``[B, 512, T_sem]`` teacher-rate features.
        Returns ``(acoustic [B, latent, T], semantic [B, 512, T], frame_lengths [B] or None)``.
        Official mode: ``frame_lengths`` is the downsampled ``semantic_lengths`` (None if not given).
        ``host_checks`` (masked mode; inference): read the lengths back to skip masking work when no item is
        shorter than the batch, and raise a ValueError for empty semantic lengths. ``False`` (training
        forward): no host read (no device sync): always masked (the same values), and the empty-lengths check
        is a device-side assert (``torch._assert_async``).
        """
        B, _, N = audio.shape
        hop = self.hop_length
        f = self.semantic_downsample_factor
        if not use_padding_mask:
            sem = downsample_features(semantic, f)
            # Inference runs the convs channels-last too (same math, float rounding differs ~1e-7).
            fast = self.fast_conv_layout and not torch.is_grad_enabled()
            acoustic = self.dac.encoder(self.dac.pad_to_hop(audio), channels_last=fast)
            T = min(acoustic.shape[-1], sem.shape[-1])
            if T == 0:
                raise ValueError("input too short: no 12.5 Hz frame after downsampling the semantic features")
            frame_lengths = None if semantic_lengths is None else downsample_lengths(semantic_lengths, f)
            return acoustic[..., :T], sem[..., :T], frame_lengths

        device = audio.device
        if audio_lengths is None:
            audio_lengths = torch.full((B,), N, device=device, dtype=torch.long)
        if semantic_lengths is None:
            semantic_lengths = torch.full((B,), semantic.shape[-1], device=device, dtype=torch.long)
        # Whatever the caller padded with, an item alone sees zeros (multiplying by 1 changes nothing).
        if not host_checks or bool((audio_lengths != N).any()):
            audio = audio * (torch.arange(N, device=device) < audio_lengths.unsqueeze(1)).unsqueeze(1)
        audio = self.dac.pad_to_hop(audio)
        padded_lengths = (audio_lengths + hop - 1) // hop * hop
        # Ragged: then also mask every conv input (the masks are all-ones otherwise: same values).
        ragged = not host_checks or bool((padded_lengths != audio.shape[-1]).any())
        acoustic = self.dac.encoder(audio, padded_lengths if ragged else None, channels_last=self.fast_conv_layout)
        sem, sem_len = downsample_features_per_item(semantic, semantic_lengths, f)
        T = min(acoustic.shape[-1], sem.shape[-1])
        too_short = "input too short: no 12.5 Hz frame after downsampling the semantic features"
        if T == 0 or (host_checks and bool((sem_len == 0).any())):
            raise ValueError(too_short)
        if not host_checks:
            torch._assert_async((sem_len > 0).all(), too_short)
        frame_lengths = torch.minimum(padded_lengths // hop, sem_len).clamp(max=T)  # (no host->device copy)
        keep = (torch.arange(T, device=device) < frame_lengths.unsqueeze(1)).unsqueeze(1)
        return acoustic[..., :T] * keep, sem[..., :T] * keep, frame_lengths

    def group(self, semantic: torch.Tensor, threshold: torch.Tensor, frame_lengths: torch.Tensor | None,
              use_padding_mask: bool = True, static_groups: bool = False) -> Grouping:
        """Merge 12.5 Hz frames into tokens (every frame is a token for fixed-rate models).
        ``static_groups`` (masked mode with frame lengths): the group axis has T entries, not the largest group
        count, so nothing is read back to the host (see `group_frames`)."""
        if not self.use_similarity_alignment:
            threshold = torch.full_like(threshold, 2.0)  # cos <= 2 always: one token per frame
        cap = self.max_tokens_per_group if self.use_similarity_alignment else None
        static_groups = static_groups and use_padding_mask and frame_lengths is not None
        return group_frames(semantic, threshold, cap, frame_lengths, mask_padding=use_padding_mask,
                            static_groups=static_groups)

    def aggregate(self, acoustic: torch.Tensor, semantic: torch.Tensor, grouping: Grouping,
                  use_padding_mask: bool = True):
        """Frames → tokens for both streams: ``(semantic [B, 512, G], acoustic [B, latent, G])``."""
        if not self.use_similarity_alignment:
            return semantic, acoustic
        if self.use_query_token_aggregator:
            sem = self.semantic_aggregator(semantic, grouping.alignment, grouping.num_groups, use_padding_mask)
            ac = self.acoustic_aggregator(acoustic, grouping.alignment, grouping.num_groups, use_padding_mask)
            return sem, ac
        return mean_pool(semantic, grouping.alignment), mean_pool(acoustic, grouping.alignment)

    @staticmethod
    def _run_convnext(seq: nn.Sequential, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in seq:
            if mask is not None and isinstance(layer, ConvNeXtBlock):
                x = x * mask  # the depthwise conv must see zeros past the item's last token
            x = layer(x)
        return x

    @torch.no_grad()
    def frame_semantic_codes(self, audio: torch.Tensor, lengths: torch.Tensor, semantic_features: torch.Tensor,
                             semantic_lengths: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
        """Each 12.5 Hz frame's semantic code, i.e. the code of the token the frame was merged into: ``[B, C, T]``
        (0 past each item's frames). What a frame-rate consumer needs (the Voicebox NAR's condition), and equal
        to expanding ``encode``'s codes by their token lengths, but with nothing read back to the host (no device
        sync), for training-time targets: the group axis is static (T entries, as in `forward`), and the lengths
        must already be known valid (codec-rate audio ``[B, 1, N]``, lengths in [one teacher frame, N])."""
        audio = _as_batch_audio(audio)
        acoustic, semantic, frame_lengths = self.encode_frames(audio, semantic_features, lengths, semantic_lengths,
                                                               True, host_checks=False)
        tau = self._threshold(threshold, audio.shape[0], audio.device)
        grouping = self.group(semantic, tau, frame_lengths, True, static_groups=True)
        if not self.use_similarity_alignment:
            tokens = semantic
        elif self.use_query_token_aggregator:  # only the semantic stream: the acoustic one is not needed here
            tokens = self.semantic_aggregator(semantic, grouping.alignment, grouping.num_groups, True)
        else:
            tokens = mean_pool(semantic, grouping.alignment)
        _, codes = self._quantize_semantic(tokens, grouping.group_mask.unsqueeze(1).to(tokens.dtype))
        return expand_groups(codes.long(), grouping.frame_to_group)

    def _quantize_semantic(self, semantic_tokens: torch.Tensor, mask: torch.Tensor | None):
        """ConvNeXt encoder → FSQ: ``(quantised, codes)``."""
        x = self._run_convnext(self.convnext_encoder, semantic_tokens, mask)
        with _no_autocast(x):  # code decisions in fp32 even under bf16 autocast
            return self.semantic_vq(x.float())

    def semantic_branch(self, semantic_tokens: torch.Tensor, group_mask: torch.Tensor | None = None):
        """ConvNeXt encoder → FSQ → ConvNeXt decoder: ``(codes [B, C, G] int32, quantised, decoded [B, latent, G])``."""
        mask = None if group_mask is None else group_mask.unsqueeze(1).to(semantic_tokens.dtype)
        quantized, codes = self._quantize_semantic(semantic_tokens, mask)
        decoded = self._run_convnext(self.convnext_decoder, quantized, mask) if self.decode_semantic_for_codec \
            else quantized
        return codes, quantized, decoded

    def bottleneck(self, latent: torch.Tensor, frame_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Bottleneck transformer over 12.5 Hz frames (identity for fixed-rate models)."""
        if not self.use_similarity_alignment:
            return latent  # official stage-1 path decodes without the bottleneck
        if isinstance(self.bottleneck_transformer, ProjectedTransformer):
            return self.bottleneck_transformer(latent, frame_lengths)
        return self.bottleneck_transformer(latent)

    def dac_decode(self, latent: torch.Tensor, frame_lengths: torch.Tensor | None = None,
                   channels_last: bool = False) -> torch.Tensor:
        """DAC decoder ``[B, latent, T]`` → ``[B, 1, hop·T - δ]``; with ``frame_lengths`` each item
        is decoded as if alone (masked convs, zero past its own output length)."""
        audio = self.dac.decoder(latent, frame_lengths, channels_last=channels_last)
        if frame_lengths is not None:
            valid = frame_lengths * self.hop_length + (audio.shape[-1] - self.hop_length * latent.shape[-1])
            audio = audio * (torch.arange(audio.shape[-1], device=audio.device) < valid.unsqueeze(1)).unsqueeze(1)
        return audio

    def decode_latent(self, latent: torch.Tensor, frame_lengths: torch.Tensor | None = None,
                      channels_last: bool = False) -> torch.Tensor:
        """12.5 Hz latent ``[B, latent, T]`` → bottleneck → DAC decoder → ``[B, 1, hop·T - δ]``."""
        return self.dac_decode(self.bottleneck(latent, frame_lengths), frame_lengths, channels_last)

    # ------------------------------------------------------------------ inference API
    @torch.no_grad()
    def encode(self, wav: torch.Tensor, lengths: torch.Tensor | None = None, sample_rate: int = 16000,
               threshold: float | torch.Tensor = 0.91, num_quantizers: int | None = 8,
               semantic_features: torch.Tensor | None = None, semantic_lengths: torch.Tensor | None = None,
               use_padding_mask: bool = True, return_alignment: bool = False,
               sync_free: bool | None = None) -> CodecTokens:
        """Encode audio into tokens.

        wav: ``[N]``, ``[B, N]`` or ``[B, 1, N]`` at ``sample_rate`` (resampled to the codec rate);
        lengths: ``[B]`` valid samples (default: all). threshold τ: float or ``[B]``; a new token starts
        where neighbour cosine similarity <= τ (1.0 = fixed 12.5 Hz). num_quantizers: total codebooks
        counting the FSQ one (1 = semantic only, None = all ``n_codebooks`` acoustic stages + FSQ).
        semantic_features: ``[B, 512, T_sem]`` teacher features at the teacher rate (else the
        ``semantic_teacher`` is run); semantic_lengths: their valid lengths (default with ``lengths``:
        the SenseVoice frame count of each item, ceil((1 + (N16 - 400) // 160) / 6)).
        use_padding_mask=False reproduces the official (unmasked) computation.
        return_alignment: also return the merge (``tokens.alignment``, a :class:`TokenAlignment`: each token's
        frame span and the neighbour similarities compared with τ), e.g. to draw it.
        sync_free (default: on accelerators; masked mode with features given): one host read per call, at
        the end (the token count, to trim the group axis), instead of reads between kernels that leave a GPU
        waiting: the group axis is padded to the frame count while computing and every item is masked. Codes
        equal the other path's. On CPU host reads cost nothing and skipping unneeded masks is faster.
        """
        audio = _as_batch_audio(wav)
        B, _, N = audio.shape
        device = audio.device
        if sync_free is None:
            sync_free = device.type != "cpu"
        sync_free = sync_free and use_padding_mask and semantic_features is not None
        in_lengths = (torch.full((B,), N, dtype=torch.long, device=device) if lengths is None
                      else torch.as_tensor(lengths, device=device).long())
        bad_lengths = f"lengths must be in [1, {N}]"
        on_device = torch.is_tensor(lengths) and lengths.device.type != "cpu"
        if on_device and sync_free:
            torch._assert_async(((in_lengths <= N) & (in_lengths > 0)).all(), bad_lengths)
        elif lengths is not None:  # host lengths are checked for free; device ones are read back (host syncs on)
            check_host_lengths(lengths.cpu() if on_device else lengths, 1, N, bad_lengths)
        audio16, lengths16 = resample(audio, in_lengths, sample_rate, self.sample_rate)
        if semantic_features is None:
            semantic_features, semantic_lengths = self._teacher_features(audio16, lengths16)
        semantic_features = semantic_features.to(device).float()
        if semantic_lengths is not None:
            semantic_lengths = torch.as_tensor(semantic_lengths, device=device).long()
        elif use_padding_mask and lengths is not None:  # SenseVoice frames of each item (25/10 ms fbank, LFR 6)
            semantic_lengths = teacher_frames(lengths16).clamp(max=semantic_features.shape[-1])
        if num_quantizers is not None and not 1 <= num_quantizers <= self.n_codebooks + 1:
            raise ValueError(f"num_quantizers must be in [1, {self.n_codebooks + 1}] or None")

        acoustic, semantic, frame_lengths = self.encode_frames(
            audio16, semantic_features, lengths16 if use_padding_mask else None, semantic_lengths, use_padding_mask,
            host_checks=not sync_free)
        tau = self._threshold(threshold, B, device)
        grouping = self.group(semantic, tau, frame_lengths, use_padding_mask, static_groups=sync_free)
        group_mask = grouping.group_mask if use_padding_mask else None
        sem_tokens, ac_tokens = self.aggregate(acoustic, semantic, grouping, use_padding_mask)
        sem_codes, _, sem_decoded = self.semantic_branch(sem_tokens, group_mask)

        n_acoustic = self.n_codebooks if num_quantizers is None else num_quantizers - 1
        acoustic_codes = None
        if n_acoustic > 0:
            # fp32 island (as in `forward`): the residual and the nearest-codeword search decide discrete codes; in
            # bf16 near-ties would flip codes with the dtype. Small tensors: [B, latent, G] at ~12.5 Hz.
            with _no_autocast(ac_tokens):
                acoustic_codes = self.dac.quantizer((ac_tokens - sem_decoded).float(), n_acoustic).codes

        valid = grouping.group_mask
        token_lengths = grouping.token_lengths * valid
        semantic_codes = sem_codes.long() * valid.unsqueeze(1)
        if sync_free:  # the one host read: trim the static group axis (T entries) to the largest token count
            g = int(grouping.num_groups.max()) if B else 0
            valid, token_lengths, semantic_codes = valid[:, :g], token_lengths[:, :g], semantic_codes[..., :g]
            acoustic_codes = None if acoustic_codes is None else acoustic_codes[..., :g]
        if semantic_codes.shape[1] == 1:
            semantic_codes = semantic_codes[:, 0]
        if acoustic_codes is not None:
            acoustic_codes = acoustic_codes * valid.unsqueeze(1)
        num_tokens = grouping.num_groups
        duration = lengths16.double() / self.sample_rate
        frame_rate = (num_tokens.double() / duration).float()
        bits = math.log2(self.semantic_vq.codebook_size) * self.semantic_vq.fsq.num_codebooks
        bits += n_acoustic * math.log2(self.dac.quantizer.codebook_size)
        alignment = self._token_alignment(grouping, tau, token_lengths) if return_alignment else None
        return CodecTokens(semantic_codes, acoustic_codes, token_lengths, num_tokens, token_lengths.sum(1),
                           in_lengths, int(sample_rate), frame_rate, frame_rate * bits, alignment)

    def _token_alignment(self, grouping: Grouping, tau: torch.Tensor, token_lengths: torch.Tensor) -> TokenAlignment:
        """Spans and similarities of an ``encode`` merge. Starts come from the frame → token map (not from
        ``token_lengths``), so the two descriptions of the merge can be checked against each other."""
        f2g = grouping.frame_to_group
        B, T = f2g.shape
        G = token_lengths.shape[1]
        num_frames = token_lengths.sum(1)
        t = torch.arange(T, device=f2g.device).expand(B, T)
        # Padded frames (-1 in masked mode, extra groups in the official mode) go to a dummy column G.
        counted = (t < num_frames.unsqueeze(1)) & (f2g >= 0) & (f2g < grouping.num_groups.unsqueeze(1))
        idx = torch.where(counted, f2g, torch.full_like(f2g, G))
        starts = num_frames.unsqueeze(1).expand(B, G + 1).clone()  # empty tokens start at the item's end
        starts = starts.scatter_reduce(1, idx, t, reduce="amin")[:, :G]
        # Fixed-rate models split at every frame: `group` compares with τ = 2 (cos <= 2 always).
        used_tau = tau if self.use_similarity_alignment else torch.full_like(tau, 2.0)
        cap = self.max_tokens_per_group if self.use_similarity_alignment else None
        return TokenAlignment(starts, token_lengths, grouping.similarity, used_tau, num_frames, cap, self.frame_rate)

    def semantic_features(self, semantic_codes: torch.Tensor, token_lengths: torch.Tensor | None = None,
                          expand: bool = False) -> torch.Tensor:
        """Semantic token codes → the codec's semantic vectors (official ``get_semantic_feature``):
        FSQ dequantisation → ConvNeXt decoder (skipped when ``decode_semantic_for_codec`` is False).

        semantic_codes: ``[B, G]`` or ``[B, C, G]`` FSQ indices. Returns ``[B, latent_dim, G]`` (one vector per
        token), or with ``expand=True`` ``[B, latent_dim, T]`` (each token copied to its ``token_lengths``
        frames, as the decoder sees it; needs ``token_lengths``). Without ``token_lengths`` every token is valid
        and the numbers are the official ones; with them, padding tokens (length 0) are masked out of the
        ConvNeXt (a batched item gives what it gives alone) and zeroed.
        """
        if semantic_codes.dim() == 2:
            semantic_codes = semantic_codes.unsqueeze(1)
        if semantic_codes.dim() != 3:
            raise ValueError(f"semantic_codes must be [B, G] or [B, C, G], got {tuple(semantic_codes.shape)}")
        if expand and token_lengths is None:
            raise ValueError("expand=True needs token_lengths (frames per token)")
        mask = None
        if token_lengths is not None:
            token_lengths = torch.as_tensor(token_lengths, device=semantic_codes.device).long()
            if token_lengths.shape != (semantic_codes.shape[0], semantic_codes.shape[-1]):
                raise ValueError(f"token_lengths must be [B, G] = {(semantic_codes.shape[0], semantic_codes.shape[-1])}"
                                 f", got {tuple(token_lengths.shape)}")
            mask = (token_lengths > 0).unsqueeze(1)
        features = self.semantic_vq.from_codes(semantic_codes.long())
        if self.decode_semantic_for_codec:
            conv_mask = None if mask is None else mask.to(features.dtype)
            features = self._run_convnext(self.convnext_decoder, features, conv_mask)
        if mask is not None:
            features = features * mask
        if expand:
            features = expand_groups(features, frame_to_group_from_lengths(token_lengths))
        return features

    def decode_codes(self, semantic_codes: torch.Tensor, acoustic_codes: torch.Tensor | None,
                     token_lengths: torch.Tensor, use_padding_mask: bool = True,
                     num_frames: int | None = None) -> torch.Tensor:
        """Codes → raw decoder output ``[B, 1, hop·T - δ]`` (T = max frames), like the official
        ``decode_from_codes`` (not trimmed). ``semantic_codes`` ``[B, G]`` or ``[B, C, G]``.
        ``num_frames``: T when the caller knows it (then nothing is read back to the host, and every item is
        masked: the same values)."""
        if semantic_codes.dim() == 2:
            semantic_codes = semantic_codes.unsqueeze(1)
        token_lengths = token_lengths.long()
        group_mask = (token_lengths > 0) if use_padding_mask else None
        semantic = self.semantic_vq.from_codes(semantic_codes)
        if self.decode_semantic_for_codec:
            mask = None if group_mask is None else group_mask.unsqueeze(1).to(semantic.dtype)
            semantic = self._run_convnext(self.convnext_decoder, semantic, mask)
        acoustic = None if acoustic_codes is None else self.dac.quantizer.from_codes(acoustic_codes)
        frame_lengths = token_lengths.sum(1)
        if self.use_similarity_alignment:
            f2g = frame_to_group_from_lengths(token_lengths, num_frames)
            latent = expand_groups(semantic, f2g)
            if acoustic is not None:
                latent = expand_groups(acoustic, f2g) + latent
        else:
            latent = semantic if acoustic is None else acoustic + semantic
        # Masks only matter when items end at different frames (the batch's longest needs none).
        ragged = use_padding_mask and (num_frames is not None or bool((frame_lengths != latent.shape[-1]).any()))
        return self.decode_latent(latent, frame_lengths if ragged else None,
                                  channels_last=self.fast_conv_layout and not torch.is_grad_enabled())

    @torch.no_grad()
    def decode(self, tokens: CodecTokens, sample_rate: int | None = None, use_padding_mask: bool = True,
               sync_free: bool | None = None) -> CodecAudio:
        """Tokens → waveform at ``sample_rate`` (default: the encoded input's rate), each item
        trimmed (or zero-padded) to its input length.
        sync_free (default: on accelerators, masked mode): the sizes (frames, samples) are read back to the
        host once, before any decoding work is queued, instead of between kernels; every item is masked."""
        B = tokens.token_lengths.shape[0]
        lengths16 = torch.round(tokens.num_samples.double() * self.sample_rate / tokens.sample_rate).long()
        if sync_free is None:
            sync_free = tokens.token_lengths.device.type != "cpu"
        num_frames = n16 = n_in = None
        if sync_free and use_padding_mask and B:
            num_frames, n16, n_in = torch.stack([tokens.token_lengths.sum(1).max(), lengths16.max(),
                                                 tokens.num_samples.max()]).tolist()
        audio = self.decode_codes(tokens.semantic_codes, tokens.acoustic_codes, tokens.token_lengths,
                                  use_padding_mask, num_frames).float()
        if n16 is None:
            n16 = int(lengths16.max()) if B else 0
        audio = F.pad(audio, (0, max(0, n16 - audio.shape[-1])))[..., :n16]
        keep = torch.arange(n16, device=audio.device) < lengths16.to(audio.device).unsqueeze(1)
        audio = audio * keep.unsqueeze(1)
        out_sr = tokens.sample_rate if sample_rate is None else int(sample_rate)
        audio, lengths = resample(audio, lengths16.to(audio.device), self.sample_rate, out_sr)
        if out_sr == tokens.sample_rate:
            lengths = tokens.num_samples.to(audio.device)
            n = n_in if n_in is not None else (int(lengths.max()) if B else 0)
            audio = F.pad(audio, (0, max(0, n - audio.shape[-1])))[..., :n]
        return CodecAudio(audio, lengths, out_sr)

    # ------------------------------------------------------------------ training forward
    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None,
                semantic_features: torch.Tensor | None = None, semantic_lengths: torch.Tensor | None = None,
                threshold: float | torch.Tensor | None = None, n_quantizers: int | None = None,
                bypass_quantize: bool | None = None, bypass_quantize_rate: float = 0.125,
                quantizer_dropout: bool | None = None, use_padding_mask: bool = True) -> CodecForwardOutput:
        """Encode + quantise + decode with gradients (codec-rate audio ``[B, 1, N]`` or ``[B, N]``).

        threshold: τ (float or ``[B]``); None → U(lower, upper) per item when training with
        ``use_dynamic_similarity_threshold``, else ``similarity_threshold``.
        n_quantizers: acoustic RVQ stages (None = all). bypass_quantize: skip the RVQ (semantic-only
        reconstruction); None → drawn once per call with ``bypass_quantize_rate`` when training.
        quantizer_dropout: per-item random number of RVQ stages; None → ``self.training``.
        All random draws use torch's RNG (seed per rank in the caller for diversity).
        """
        audio = _as_batch_audio(wav)
        B, _, N = audio.shape
        device = audio.device
        if semantic_features is None:
            lens = lengths if lengths is not None else torch.full((B,), N, dtype=torch.long, device=device)
            semantic_features, semantic_lengths = self._teacher_features(audio, lens)
        elif semantic_lengths is None and lengths is not None and use_padding_mask:
            semantic_lengths = teacher_frames(lengths).clamp(max=semantic_features.shape[-1])
        # Masked mode (the training default) reads nothing back to the host (no device sync): the group axis is
        # padded to T and padding is always masked (padded groups and all-ones masks change no loss).
        acoustic, semantic, frame_lengths = self.encode_frames(
            audio, semantic_features, lengths if use_padding_mask else None, semantic_lengths, use_padding_mask,
            host_checks=False)
        T = acoustic.shape[-1]
        tau = self._threshold(threshold, B, device)
        static = use_padding_mask and frame_lengths is not None
        grouping = self.group(semantic, tau, frame_lengths, use_padding_mask, static_groups=static)
        group_mask = grouping.group_mask
        sem_tokens, ac_tokens = self.aggregate(acoustic, semantic, grouping, use_padding_mask)
        sem_codes, _, sem_decoded = self.semantic_branch(sem_tokens, group_mask if use_padding_mask else None)

        if bypass_quantize is None:
            bypass_quantize = self.training and bool(torch.rand(()) < bypass_quantize_rate)
        if quantizer_dropout is None:
            quantizer_dropout = self.training
        f2g = grouping.frame_to_group
        latent = expand_groups(sem_decoded, f2g) if self.use_similarity_alignment else sem_decoded
        zero = audio.new_zeros(())
        commitment, codebook, acoustic_codes, n_q = zero, zero, None, None
        if not bypass_quantize:
            # The VQ losses average over the compact layout's groups (padded groups included, as before the
            # group axis was padded to T): the extra columns are masked out of them.
            vq_mask = None
            if static:
                vq_mask = torch.arange(ac_tokens.shape[-1], device=device) < grouping.compact_groups
            # fp32 island: the residual subtraction, the nearest-codeword search (code decisions: the same codes as
            # at inference, which runs it in fp32 too) and the commitment / codebook MSEs (differences of close
            # vectors) stay fp32 under bf16 autocast. Cheap: [B, latent, G] frames at ~12.5 Hz.
            with _no_autocast(ac_tokens):
                rvq = self.dac.quantizer((ac_tokens - sem_decoded).float(), n_quantizers, dropout=quantizer_dropout,
                                         loss_mask=vq_mask)
            commitment, codebook, acoustic_codes, n_q = rvq.commitment_loss, rvq.codebook_loss, rvq.codes, rvq.n_quantizers
            acoustic_latent = expand_groups(rvq.quantized, f2g) if self.use_similarity_alignment else rvq.quantized
            latent = acoustic_latent + latent

        frame_mask = torch.ones(B, T, dtype=torch.bool, device=device) if frame_lengths is None else \
            torch.arange(T, device=device) < frame_lengths.unsqueeze(1)
        ragged = use_padding_mask and frame_lengths is not None  # masks of full items are all-ones: no host check
        bottleneck = self.bottleneck(latent, frame_lengths if ragged else None)
        out = self.dac_decode(bottleneck, frame_lengths if ragged else None,
                              channels_last=use_padding_mask and self.fast_conv_layout)
        out = F.pad(out, (0, max(0, N - out.shape[-1])))[..., :N]
        if lengths is not None and use_padding_mask:
            out = out * (torch.arange(N, device=device) < lengths.unsqueeze(1)).unsqueeze(1)

        target = mean_pool(semantic, grouping.alignment).detach() if self.use_similarity_alignment \
            else semantic.detach()
        return CodecForwardOutput(
            audio=out, commitment_loss=commitment, codebook_loss=codebook, semantic_aggregated=sem_tokens,
            semantic_decoded=sem_decoded, semantic_target=target, semantic_frames=semantic.detach(),
            acoustic_frames=acoustic, bottleneck_output=bottleneck, semantic_codes=sem_codes,
            acoustic_codes=acoustic_codes, token_lengths=grouping.token_lengths * group_mask, group_mask=group_mask,
            frame_mask=frame_mask, num_tokens=grouping.num_groups, threshold=tau, n_quantizers=n_q,
            bypassed_quantize=bool(bypass_quantize))
