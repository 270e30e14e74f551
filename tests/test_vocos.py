"""Vocos 24 kHz vocoder: parity with the official code (shared/reference/vocos_tiny), keys, ISTFT, import."""
import json
import sys
from pathlib import Path

import pytest
import torch

from flexitrain.models.vocos import ISTFT, RELEASED_VOCOS, TINY_VOCOS, Vocos, import_released_vocos


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ref(shared_reference):
    from safetensors.torch import load_file

    d = shared_reference / "vocos_tiny"
    return load_file(str(d / "reference_io.safetensors")), d


def test_matches_official(ref):
    from safetensors.torch import load_file

    io, d = ref
    model = Vocos(**TINY_VOCOS)
    model.load_state_dict(load_file(str(d / "state_dict.safetensors")), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(io["mel"]), io["backbone_out"], atol=1e-4, rtol=0)
        wav = model(io["mel"])
    assert wav.shape == (1, 1, 127 * 480)
    torch.testing.assert_close(wav[:, 0], io["wav"], atol=1e-5, rtol=0)


def test_released_key_set_on_meta(ref):
    released = json.loads((ref[1] / "released_keys.json").read_text())
    with torch.device("meta"):
        model = Vocos(**RELEASED_VOCOS)
    state = model.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == {k: v["shape"] for k, v in released["keys"].items()}
    assert sum(p.numel() for p in model.parameters()) == released["n_params"]  # the window is a buffer


def test_stft_istft_round_trip():
    istft = ISTFT(1920, 480)
    x = torch.randn(2, 480 * 20)
    y = istft(istft.stft(x))
    assert y.shape == x.shape
    torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match=r"mel \[B, 128, T\]"):
        Vocos(**TINY_VOCOS)(torch.zeros(1, 80, 10))
    with pytest.raises(ValueError, match="not a Vocos"):
        import_released_vocos({"foo": torch.zeros(1)})


def test_import_tool(ref, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import import_vocos

    assert import_vocos.main([str(ref[1] / "state_dict.safetensors"), "--out", str(tmp_path / "vocos")]) == 0
    model = Vocos.from_pretrained(tmp_path / "vocos")
    assert model.config["dim"] == 64 and model.config["num_layers"] == 2
    state = load_file(str(ref[1] / "state_dict.safetensors"))
    state["head.out.weight"] = state["head.out.weight"][:, :32].contiguous()
    save_file(state, str(tmp_path / "bad.safetensors"))
    assert import_vocos.main([str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "bad")]) == 1
    assert "head.out.weight: checkpoint (1922, 32) vs model (1922, 64)" in capsys.readouterr().err
