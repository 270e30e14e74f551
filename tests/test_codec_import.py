"""Official checkpoint import: fp16 → fp32, strict keys with an ignore list, clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flexitrain.models.codec import CheckpointMismatchError, FlexiCodec
from flexitrain.models.codec.checkpoint import import_official

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT.parent / "shared" / "reference" / "flexicodec_tiny"
pytestmark = [
    pytest.mark.skipif(not REF.is_dir(), reason=f"reference vectors not found at {REF}"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def official():
    config = json.loads((REF / "reference_cases.json").read_text())["config"]
    return config, load_file(str(REF / "official_state_dict.safetensors"))


def _import_tool():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import import_official as tool
    finally:
        sys.path.pop(0)
    return tool


def write_config(path: Path, config: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"model": config}))
    return path


def test_import_fp16_roundtrip(tmp_path, official):
    config, state = official
    half = {k: v.half() for k, v in state.items()}
    half["repa_mlp.0.weight"] = torch.zeros(4, 4, dtype=torch.float16)  # training-only: ignored
    save_file(half, str(tmp_path / "official.safetensors"))
    rc = _import_tool().main([str(tmp_path / "official.safetensors"), "--config",
                              str(write_config(tmp_path / "cfg.yaml", config)), "--out", str(tmp_path / "ckpt")])
    assert rc == 0
    model = FlexiCodec.from_pretrained(tmp_path / "ckpt")
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert loaded[k].dtype == torch.float32
        assert torch.equal(loaded[k], v.half().float()), k
    assert not model.training and model.config["n_codebooks"] == config["n_codebooks"]
    again = FlexiCodec.from_pretrained(model.save_pretrained(tmp_path / "again"))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in loaded.items())


def test_import_errors_name_every_bad_key(tmp_path, official, capsys):
    config, state = official
    bad = {k: v.half() for k, v in state.items() if k != "dac.decoder.model.0.bias"}
    bad["some.extra.weight"] = torch.zeros(3, dtype=torch.float16)
    bad["semantic_vq.fsq.project_in.weight"] = torch.zeros(5, 7, dtype=torch.float16)
    bad["semantic_model.embed.weight"] = torch.zeros(16, 560, dtype=torch.float16)  # teacher: ignored
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        import_official(tmp_path / "bad.safetensors", config, tmp_path / "out")
    msg = str(err.value)
    assert "missing keys (1)" in msg and "dac.decoder.model.0.bias" in msg
    assert "unexpected keys (1)" in msg and "some.extra.weight" in msg
    assert "semantic_vq.fsq.project_in.weight: checkpoint (5, 7) vs model (5, 64)" in msg
    assert "semantic_model" not in msg
    assert err.value.missing == ["dac.decoder.model.0.bias"] and err.value.unexpected == ["some.extra.weight"]
    assert not (tmp_path / "out").exists()
    rc = _import_tool().main([str(tmp_path / "bad.safetensors"), "--config",
                              str(write_config(tmp_path / "cfg.yaml", config)), "--out", str(tmp_path / "o2")])
    assert rc == 2 and "some.extra.weight" in capsys.readouterr().err


def test_allow_missing_for_stage2_init(tmp_path, official):
    config, state = official
    partial = {k: v for k, v in state.items() if not k.startswith(("semantic_aggregator.", "acoustic_aggregator."))}
    save_file(partial, str(tmp_path / "p.safetensors"))
    with pytest.raises(CheckpointMismatchError):
        import_official(tmp_path / "p.safetensors", config, tmp_path / "a")
    import_official(tmp_path / "p.safetensors", config, tmp_path / "b",
                    allow_missing=["semantic_aggregator.*", "acoustic_aggregator.*"])
    assert (tmp_path / "b" / "model.safetensors").is_file()


def test_config_and_pretrained_errors(tmp_path, official):
    config, _ = official
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        FlexiCodec.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown FlexiCodec config keys: \\['n_codebookz'\\]"):
        import_official(tmp_path / "x.safetensors", {**config, "n_codebookz": 3}, tmp_path / "c")
