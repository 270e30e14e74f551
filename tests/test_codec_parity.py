"""FlexiCodec reproduces the official reference vectors (../shared/reference/flexicodec_tiny)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tolerances import NETWORK_REL

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REF = SHARED / "reference" / "flexicodec_tiny"
KEYS = SHARED / "reference" / "flexicodec_released_keys.json"

pytestmark = [
    pytest.mark.skipif(not REF.is_dir(), reason=f"reference vectors not found at {REF}"),
    pytest.mark.usefixtures("one_thread"),
]


def _parity_main():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import parity
    finally:
        sys.path.pop(0)
    return parity.main


@pytest.mark.parity
def test_parity_tool_all_cases(capsys):
    from safetensors.torch import load_file

    # Codes and token lengths must be identical: they are decisions, and every decision in these cases is far from
    # its boundary compared with float32 error (~1e-6 in the compared quantities): merging |cos sim - τ| ≥ 3.5e-4,
    # FSQ values ≥ 5.7e-4 from a rounding boundary, RVQ nearest vs second-nearest squared distance ≥ 7.8e-5.
    # Audio: the decoder is a float32 network, tolerances.NETWORK_REL: 256 EPS·max|audio| (0.143) = 4.4e-6 (was the
    # tool's default 1e-4 = 5900 EPS·max). Measured 1.5e-7 (8.8 EPS·max); official float64 vs float32 1.3e-7.
    io = load_file(str(REF / "reference_io.safetensors"))
    tol = NETWORK_REL * max(float(v.abs().max()) for k, v in io.items() if k.endswith("_audio_out"))
    rc = _parity_main()([str(REF), "--tol", repr(tol)])
    lines = capsys.readouterr().out.strip().splitlines()
    n = len(json.loads((REF / "reference_cases.json").read_text())["cases"])
    assert lines[-1].startswith(f"parity: {n}/{n} cases match, max |Δaudio| = "), lines[-1]
    assert rc == 0
    assert float(lines[-1].rsplit("= ", 1)[1]) <= tol


@pytest.mark.parity
def test_parity_tool_fails_on_wrong_weights(tmp_path, capsys):
    """The tool must notice a wrong model: perturb one RVQ codebook and expect a non-zero exit."""
    from safetensors.torch import load_file, save_file

    for name in ("reference_cases.json", "reference_io.safetensors"):
        (tmp_path / name).symlink_to(REF / name)
    state = load_file(str(REF / "official_state_dict.safetensors"))
    state["dac.quantizer.quantizers.0.codebook.weight"] = torch.randn_like(
        state["dac.quantizer.quantizers.0.codebook.weight"])
    save_file(state, str(tmp_path / "official_state_dict.safetensors"))
    spec = json.loads((REF / "reference_cases.json").read_text())
    spec["cases"] = [c for c in spec["cases"] if c["num_quantizers"] == 3][:2]
    (tmp_path / "reference_cases.json").unlink()
    (tmp_path / "reference_cases.json").write_text(json.dumps(spec))
    rc = _parity_main()([str(tmp_path)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc != 0
    assert last.startswith("parity: 0/2 cases match"), last


@pytest.mark.skipif(not KEYS.is_file(), reason="released key list missing")
def test_released_config_keys_shapes_and_params():
    from flexitrain.models.codec import FlexiCodec
    from flexitrain.models.codec.config import RELEASED_CONFIG

    ref = json.loads(KEYS.read_text())
    cfg = dict(RELEASED_CONFIG)
    for k, v in ref["config"].items():
        assert cfg[k] == v, k
    with torch.device("meta"):
        model = FlexiCodec(**cfg)
    state = model.state_dict()
    assert list(state) == list(ref["keys"])  # same keys, same order
    for k, (shape, dtype) in ref["keys"].items():
        assert list(state[k].shape) == shape, k
        assert str(state[k].dtype).replace("torch.", "") == dtype, k
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref["trainable_params"] == 214_943_223
