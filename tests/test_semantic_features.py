"""``FlexiCodec.semantic_features`` (official ``get_semantic_feature``) and ``encode(..., return_alignment=True)``.

The parity test runs the official code (pip ``flexicodec==0.1.2``, installed ``--no-deps`` into a cache folder,
or ``$FLEXICODEC_OFFICIAL``: a ``pip --target`` folder holding it) in a subprocess, so that its import stubs
(``tools/bench_codec.install_stubs``) never reach this process; it skips when the package cannot be had.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from codec_fixtures import TINY_CODEC

from flexitrain.models.codec import FlexiCodec
from flexitrain.models.codec.merging import downsample_features_per_item
from tolerances import NETWORK_REL

ROOT = Path(__file__).resolve().parents[1]

TINY = {**TINY_CODEC, "transformer_num_layers": 1}

# Configurations the parity test covers: the release's semantic path (one 32768-entry FSQ codebook → ConvNeXt),
# a multi-codebook FSQ with odd levels through a causal ConvNeXt, and no ConvNeXt decoder at all.
PARITY_CONFIGS = {
    "default": {},
    "multi_codebook_causal": dict(fsq_config={"levels": [5, 4, 3], "num_codebooks": 2}, is_causal=True,
                                  convnext_layers=2),
    "no_convnext_decoder": dict(decode_semantic_for_codec=False),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def build(seed: int = 0, **overrides) -> FlexiCodec:
    torch.manual_seed(seed)
    m = FlexiCodec(**{**TINY, **overrides})
    with torch.no_grad():  # random but non-degenerate weights (LayerScale etc. away from init)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def model() -> FlexiCodec:
    return build()


def random_codes(m: FlexiCodec, B: int, G: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    C = m.semantic_vq.fsq.num_codebooks
    return torch.randint(0, m.semantic_vq.codebook_size, (B, C, G), generator=g)


def smooth_features(B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.randn(B, 512, T, generator=g), dim=2) * 0.3  # neighbours similar → merging


def teacher_len(n: int) -> int:
    return -(-(1 + (n - 400) // 160) // 6)


# ----------------------------------------------------------------------------------------------------------------
# semantic_features: parity with the official get_semantic_feature
# ----------------------------------------------------------------------------------------------------------------
_OFFICIAL_RUNNER = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
sys.path.insert(0, sys.argv[1])
import bench_codec
official, work = Path(sys.argv[2]), Path(sys.argv[3])
spec = json.loads((work / "spec.json").read_text())
out = {}
for name, config in spec.items():
    model = bench_codec.build_official(official, config, load_file(str(work / f"{name}_state.safetensors")))
    codes = load_file(str(work / f"{name}_codes.safetensors"))["codes"]
    with torch.no_grad():
        out[name] = model.get_semantic_feature(codes).contiguous()
save_file(out, str(work / "official_out.safetensors"))
"""


def official_package() -> Path:
    """A ``pip --target`` folder holding flexicodec==0.1.2 (installed --no-deps on first use), else skip; a
    ``$FLEXICODEC_OFFICIAL`` that holds none fails."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_codec

    try:
        return bench_codec.official_package_dir()
    except RuntimeError as e:
        if os.environ.get("FLEXICODEC_OFFICIAL"):
            pytest.fail(str(e))
        pytest.skip(str(e))


def test_semantic_features_match_official_get_semantic_feature(tmp_path):
    from safetensors.torch import load_file, save_file

    official = official_package()
    ours, spec = {}, {}
    for i, (name, overrides) in enumerate(PARITY_CONFIGS.items()):
        m = build(seed=i, **overrides)
        codes = random_codes(m, B=2, G=11, seed=i)
        with torch.no_grad():
            ours[name] = m.semantic_features(codes)
        spec[name] = {**TINY, **overrides}
        save_file(m.codec_state_dict(), str(tmp_path / f"{name}_state.safetensors"))
        save_file({"codes": codes.to(torch.int32)}, str(tmp_path / f"{name}_codes.safetensors"))  # official: int32
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    res = subprocess.run([sys.executable, "-c", _OFFICIAL_RUNNER, str(ROOT / "tools"), str(official), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    ref = load_file(str(tmp_path / "official_out.safetensors"))
    for name, got in ours.items():
        want = ref[name]
        assert got.shape == want.shape, (name, tuple(got.shape), tuple(want.shape))
        # Same float32 network evaluated in another operation order: NETWORK_REL · max|output| (tolerances.py).
        tol = NETWORK_REL * float(want.abs().max())
        err = float((got - want).abs().max())
        assert err <= tol, f"{name}: max |Δ| {err:.3g} > {tol:.3g}"
        # The comparison can fail: a different code changes the vector far beyond the bound.
        assert float((got[..., 1:] - want[..., :-1]).abs().max()) > 100 * tol


# ----------------------------------------------------------------------------------------------------------------
# semantic_features: what the codec itself computes
# ----------------------------------------------------------------------------------------------------------------
def test_semantic_features_are_the_decoded_semantic_stream(model):
    """The vectors encode's semantic branch produces for its codes (what the decoder adds to the acoustics)."""
    tokens = torch.randn(2, 512, 9, generator=torch.Generator().manual_seed(3))
    codes, _, decoded = model.semantic_branch(tokens)
    torch.testing.assert_close(model.semantic_features(codes), decoded, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.semantic_features(codes[:, 0]), decoded, rtol=0, atol=1e-6)  # [B, G] codes


def test_padding_tokens_are_masked_and_expand_copies_tokens_to_frames(model):
    codes = random_codes(model, B=2, G=7)
    lengths = torch.tensor([[2, 1, 3, 1, 1, 2, 1], [1, 4, 2, 1, 0, 0, 0]])
    batched = model.semantic_features(codes, lengths)
    alone = model.semantic_features(codes[1:, :, :4])
    torch.testing.assert_close(batched[1, :, :4], alone[0], rtol=0, atol=1e-6)  # padding does not leak in
    assert batched[1, :, 4:].abs().max() == 0
    unmasked = model.semantic_features(codes)[1, :, :4]
    assert (unmasked - alone[0]).abs().max() > 1e-4  # the mask matters (non-causal ConvNeXt sees the padding)

    frames = model.semantic_features(codes, lengths, expand=True)
    assert frames.shape == (2, batched.shape[1], 11)
    f2g = torch.repeat_interleave(torch.arange(7), lengths[0])
    torch.testing.assert_close(frames[0], batched[0][:, f2g], rtol=0, atol=0)
    f2g = torch.repeat_interleave(torch.arange(4), lengths[1, :4])
    torch.testing.assert_close(frames[1, :, :8], batched[1, :, :4][:, f2g], rtol=0, atol=0)
    assert frames[1, :, 8:].abs().max() == 0


def test_semantic_features_bad_arguments(model):
    codes = random_codes(model, B=1, G=4)
    with pytest.raises(ValueError, match="expand=True needs token_lengths"):
        model.semantic_features(codes, expand=True)
    with pytest.raises(ValueError, match="token_lengths must be"):
        model.semantic_features(codes, torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="semantic_codes must be"):
        model.semantic_features(codes[0, 0])


# ----------------------------------------------------------------------------------------------------------------
# encode(..., return_alignment=True)
# ----------------------------------------------------------------------------------------------------------------
def merge_starts(sim: torch.Tensor, n: int, tau: float, cap: int | None) -> list[int]:
    """The official merge rule, written out: a token starts at frame 0, wherever sim(t-1, t) <= τ, and every
    ``cap`` frames into a run."""
    starts, run_start = [0], 0
    for t in range(1, n):
        if float(sim[t - 1]) <= tau:
            run_start = t
            starts.append(t)
        elif cap is not None and (t - run_start) % cap == 0:
            starts.append(t)
    return starts


def check_alignment(tokens, tau: float, cap: int | None) -> dict:
    al = tokens.alignment
    stats = {"similarity_splits": 0, "cap_splits": 0}
    assert torch.equal(al.token_lengths, tokens.token_lengths)
    assert torch.equal(al.num_frames, tokens.num_frames)
    for b in range(tokens.token_lengths.shape[0]):
        n, g = int(tokens.num_frames[b]), int(tokens.num_tokens[b])
        spans = al.spans(b)
        assert len(spans) == g
        # The spans tile [0, n) exactly, in order, and their lengths are the token lengths.
        assert [s for s, _ in spans] == [sum(l for _, l in spans[:i]) for i in range(g)]
        assert sum(l for _, l in spans) == n
        assert [l for _, l in spans] == tokens.token_lengths[b, :g].tolist()
        assert (al.token_starts[b, g:] == n).all() and (al.token_lengths[b, g:] == 0).all()
        # The reported similarities and τ reproduce the merge.
        want = merge_starts(al.similarity[b], n, float(al.threshold[b]), al.max_tokens_per_group)
        assert [s for s, _ in spans] == want
        sim_starts = {t for t in range(1, n) if float(al.similarity[b, t - 1]) <= tau}
        stats["similarity_splits"] += len(sim_starts)
        stats["cap_splits"] += len(set(want[1:]) - sim_starts)
    assert torch.allclose(al.threshold, torch.full_like(al.threshold, tau))
    assert al.max_tokens_per_group == cap and al.frame_rate == 12.5
    return stats


def test_alignment_spans_tile_frames_and_similarities_reproduce_the_merge(model):
    lengths = [20480, 9111, 31000]
    wav = torch.randn(3, max(lengths), generator=torch.Generator().manual_seed(1)) * 0.1
    sem_len = [teacher_len(n) for n in lengths]
    sem = smooth_features(3, max(sem_len))
    totals = {"similarity_splits": 0, "cap_splits": 0}
    for tau in (0.5, 0.91):  # 0.5: long runs, cut by the cap of 8; 0.91: mostly similarity splits
        plain = model.encode(wav, torch.tensor(lengths), threshold=tau, num_quantizers=2, semantic_features=sem,
                             semantic_lengths=torch.tensor(sem_len))
        tokens = model.encode(wav, torch.tensor(lengths), threshold=tau, num_quantizers=2, semantic_features=sem,
                              semantic_lengths=torch.tensor(sem_len), return_alignment=True)
        assert plain.alignment is None  # opt-in
        assert torch.equal(plain.semantic_codes, tokens.semantic_codes)  # asking for it changes nothing
        assert torch.equal(plain.token_lengths, tokens.token_lengths)
        for k, v in check_alignment(tokens, tau, 8).items():
            totals[k] += v
    assert totals["similarity_splits"] > 0 and totals["cap_splits"] > 0  # both rules were exercised

    # The similarities are those of the 12.5 Hz teacher frames the merge sees (cosine of neighbours).
    down, down_len = downsample_features_per_item(sem, torch.tensor(sem_len), model.semantic_downsample_factor)
    b, n = 1, int(tokens.num_frames[1])
    assert n <= int(down_len[b])
    h = down[b, :, :n]
    torch.testing.assert_close(tokens.alignment.similarity[b, :n - 1],
                               F.cosine_similarity(h[:, :-1], h[:, 1:], dim=0), rtol=0, atol=1e-6)
    assert (tokens.alignment.similarity[b, n - 1:] == 0).all()  # transitions into padding


def test_alignment_official_unmasked_mode(model):
    n = 28160
    wav = torch.randn(1, n, generator=torch.Generator().manual_seed(2)) * 0.1
    sem = smooth_features(1, teacher_len(n), seed=4)
    tokens = model.encode(wav, threshold=0.91, num_quantizers=1, semantic_features=sem, use_padding_mask=False,
                          return_alignment=True)
    check_alignment(tokens, 0.91, 8)


def test_alignment_fixed_rate_model_has_one_token_per_frame():
    m = build(use_similarity_alignment=False, use_bottleneck_transformer=False, use_query_token_aggregator=False)
    n = 20480
    wav = torch.randn(1, n, generator=torch.Generator().manual_seed(2)) * 0.1
    tokens = m.encode(wav, threshold=0.5, num_quantizers=1, semantic_features=smooth_features(1, teacher_len(n)),
                      return_alignment=True)
    al = tokens.alignment
    n_frames = int(tokens.num_frames[0])
    assert al.spans(0) == [(t, 1) for t in range(n_frames)]
    assert float(al.threshold[0]) == 2.0 and al.max_tokens_per_group is None
    assert merge_starts(al.similarity[0], n_frames, 2.0, None) == list(range(n_frames))
