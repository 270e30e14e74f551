"""Codec inference without host reads between kernels (`sync_free`, the default on accelerators): the same codes
and audio as the CPU default path, one host read per encode (the final trim) and per decode (the sizes)."""
from __future__ import annotations

import pytest
import torch

from flexitrain.models.codec import FlexiCodec
from flexitrain.utils.dispatch_count import SyncCounter

CONFIG = {"sample_rate": 16000, "encoder_dim": 16, "encoder_rates": [4, 4, 5, 8, 2], "decoder_rates": [2, 8, 5, 4, 4],
          "latent_dim": 64, "n_codebooks": 2, "codebook_size": 64, "semantic_codebook_size": 32768,
          "use_similarity_alignment": True, "semantic_downsample_factor": 1.33333, "ssl_dim": 512,
          "transformer_num_layers": 1, "transformer_dim": 64, "transformer_dim_feedforward": 128,
          "transformer_num_heads": 2, "convnext_dim": 64, "convnext_layers": 1, "agg_transformer_num_layers": 1,
          "agg_transformer_dim": 64, "agg_transformer_num_heads": 2, "agg_transformer_dim_feedforward": 128,
          "decoder_dim": 64, "max_tokens_per_group": 8, "similarity_threshold": 0.91}


def _inputs():
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(3, 1, 32000, generator=g) * 0.1
    lengths = torch.tensor([32000, 25000, 16000])
    # Smooth features (a random walk over frames): neighbours merge at the usual thresholds.
    sem = torch.randn(3, 512, 34, generator=g).cumsum(-1) / 4
    return audio, lengths, sem, torch.tensor([34, 27, 17])


@pytest.mark.parametrize("aggregator", ["query_tokens", "mean_pool"])
@pytest.mark.parametrize("threshold", [0.5, 0.91, 1.0])
def test_sync_free_codes_and_audio_equal_the_default_path(aggregator, threshold):
    torch.manual_seed(0)
    codec = FlexiCodec(**CONFIG, use_query_token_aggregator=aggregator == "query_tokens").eval()
    audio, lengths, sem, sem_lengths = _inputs()
    kw = dict(threshold=threshold, num_quantizers=None, semantic_features=sem, semantic_lengths=sem_lengths)
    ref = codec.encode(audio, lengths, sync_free=False, **kw)
    with SyncCounter() as enc:
        got = codec.encode(audio, lengths, sync_free=True, **kw)
    assert enc.syncs == 1, enc.report()  # the trim of the group axis, after all the work is queued
    for name in ("semantic_codes", "acoustic_codes", "token_lengths", "num_tokens", "num_frames"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    if threshold < 1.0:
        assert (ref.num_tokens < ref.num_frames).any()  # tokens were merged: the static axis was trimmed
    ref_audio = codec.decode(ref, sync_free=False)
    with SyncCounter() as dec:
        got_audio = codec.decode(got, sync_free=True)
    assert dec.syncs == 1, dec.report()  # frames and samples, read once before decoding
    assert got_audio.audio.shape == ref_audio.audio.shape and torch.equal(got_audio.lengths, ref_audio.lengths)
    torch.testing.assert_close(got_audio.audio, ref_audio.audio, rtol=0, atol=1e-6)


def test_sync_free_length_errors():
    codec = FlexiCodec(**CONFIG).eval()
    audio, _, sem, sem_lengths = _inputs()
    for lengths in ([32000, 0, 100], torch.tensor([32001, 100, 100])):  # host lengths: checked on the host
        with pytest.raises(ValueError, match=r"lengths must be in \[1, 32000\], got"):
            codec.encode(audio, lengths, semantic_features=sem, semantic_lengths=sem_lengths, sync_free=True)
