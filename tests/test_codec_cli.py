"""`flexitrain-codec` (flexitrain/codec_cli.py) on a tiny random codec saved as an inference folder: encode -> token
files -> decode reproduces FlexiCodec.encode / decode called in Python (codes exactly, audio to float tolerance), in
both file formats; bad files are skipped and reported; --help and usage errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import REPO_ROOT
from flexitrain.codec_cli import load_tokens, main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from hydra.utils import instantiate

    from flexitrain.models.codec import FlexiCodec
    from flexitrain.tasks.teacher import build_teacher
    from flexitrain.utils.config import compose

    root = tmp_path_factory.mktemp("codec_cli")
    torch.manual_seed(0)
    instantiate(compose(["model=codec_tiny"], return_hydra_config=False).model).save_pretrained(root / "model")
    codec = FlexiCodec.from_pretrained(root / "model").eval()
    teacher = build_teacher({"random_init": True, "num_blocks": 1}).eval()
    audio = root / "audio"
    (audio / "sub").mkdir(parents=True)
    g = np.random.default_rng(0)
    clips = {"a": (16000, 1.7), "sub/b": (22050, 2.3), "c": (16000, 0.9)}
    for name, (sr, sec) in clips.items():
        t = np.arange(int(sr * sec)) / sr
        x = 0.3 * np.sin(2 * np.pi * (150 + 200 * g.random()) * t * (1 + 0.3 * t)) + 0.01 * g.standard_normal(t.size)
        sf.write(str(audio / f"{name}.wav"), x.astype(np.float32), sr, subtype="FLOAT")
    (audio / "corrupt.wav").write_bytes(b"RIFF\x00\x00not really a wav file")
    return root, codec, teacher, clips


def reference(codec, teacher, path, nq):
    from flexitrain.models.codec.flexicodec import resample

    x, sr = sf.read(str(path), dtype="float32")
    wav = torch.from_numpy(x)[None]
    x16, n16 = resample(wav[:, None], torch.tensor([wav.shape[-1]]), sr, codec.sample_rate)
    sem, sem_len = teacher(x16[:, 0], n16)
    return codec.encode(wav, sample_rate=sr, threshold=0.86, num_quantizers=nq, semantic_features=sem,
                        semantic_lengths=sem_len)


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, json.loads(out.out.strip().splitlines()[-1]), out.err


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_round_trip_matches_python_api(setup, tmp_path, capsys, fmt):
    root, codec, teacher, clips = setup
    model = ["--model", str(root / "model"), "--teacher-random-init", "--teacher-blocks", "1"]
    rc, summary, err = run(["encode", str(root / "audio"), "--out", str(tmp_path / "tok"), "--format", fmt,
                            "--threshold", "0.86", "--num-quantizers", "3", "--files-per-step", "2", *model], capsys)
    assert rc == 0 and summary["ok"] == 3 and summary["failed"] == 1
    assert summary["failures"][0]["file"].endswith("corrupt.wav") and "unreadable audio" in summary["failures"][0]["error"]
    assert "skipped" in err and "corrupt.wav" in err

    from flexitrain.evaluation.loading import file_hash

    for name, (sr, sec) in clips.items():
        rec = load_tokens(tmp_path / "tok" / f"{name}.{fmt}")
        ref = reference(codec, teacher, root / "audio" / f"{name}.wav", 3)
        n = int(ref.num_tokens)
        assert np.array_equal(rec["semantic_codes"], ref.semantic_codes[0, :n].numpy())
        assert np.array_equal(rec["acoustic_codes"], ref.acoustic_codes[0, :, :n].numpy())
        assert rec["acoustic_codes"].shape == (2, n)
        assert np.array_equal(rec["token_lengths"], ref.token_lengths[0, :n].numpy())
        assert int(rec["token_lengths"].sum()) == int(ref.num_frames)
        assert float(rec["threshold"]) == 0.86 and int(rec["num_quantizers"]) == 3
        assert int(rec["sample_rate"]) == sr and int(rec["num_samples"]) == int(sr * sec)
        assert rec["model_hash"] == file_hash(root / "model")

    rc, summary, _ = run(["decode", str(tmp_path / "tok"), "--out", str(tmp_path / "wav"), "--model",
                          str(root / "model"), "--sample-rate", "24000"], capsys)
    assert rc == 0 and summary["ok"] == 3 and summary["failed"] == 0
    for name in clips:
        ref = reference(codec, teacher, root / "audio" / f"{name}.wav", 3)
        want = codec.decode(ref, sample_rate=24000)
        got, sr = sf.read(str(tmp_path / "wav" / f"{name}.wav"), dtype="float32")
        assert sr == 24000 and got.shape == (int(want.lengths[0]),)
        np.testing.assert_allclose(got, want.audio[0, 0, : got.size].numpy(), rtol=0, atol=1e-6)


def test_decode_reports_bad_token_files(setup, tmp_path, capsys):
    root, codec, teacher, clips = setup
    rc, summary, _ = run(["encode", str(root / "audio" / "a.wav"), "--out", str(tmp_path / "tok"), "--model",
                          str(root / "model"), "--teacher-random-init", "--teacher-blocks", "1"], capsys)
    assert rc == 0 and summary["ok"] == 1 and int(load_tokens(tmp_path / "tok" / "a.safetensors")["num_quantizers"]) == 5
    (tmp_path / "tok" / "junk.npz").write_bytes(b"nope")
    rec = load_tokens(tmp_path / "tok" / "a.safetensors")
    rec["model_hash"] = "0123456789abcdef"
    from flexitrain.codec_cli import save_tokens

    save_tokens(tmp_path / "tok" / "other.npz", rec)
    rc, summary, _ = run(["decode", str(tmp_path / "tok"), "--out", str(tmp_path / "wav"), "--model",
                          str(root / "model")], capsys)
    assert rc == 0 and summary["ok"] == 1 and summary["failed"] == 2
    errors = {f["file"].rsplit("/", 1)[-1]: f["error"] for f in summary["failures"]}
    assert "--ignore-model-hash" in errors["other.npz"] and "junk.npz" in errors
    # Nothing converted: exit status 1.
    rc, summary, _ = run(["decode", str(tmp_path / "tok" / "junk.npz"), "--out", str(tmp_path / "w2"), "--model",
                          str(root / "model")], capsys)
    assert rc == 1 and summary["ok"] == 0


def test_usage_errors_name_the_option(setup, tmp_path, capsys):
    root, *_ = setup
    with pytest.raises(SystemExit) as e:
        main(["encode", str(root / "audio"), "--out", str(tmp_path), "--model", str(tmp_path / "missing")])
    assert e.value.code == 2 and "--model" in capsys.readouterr().err and "does not exist"
    with pytest.raises(SystemExit):
        main(["encode", str(root / "audio"), "--out", str(tmp_path), "--model", str(root / "model")])
    assert "--teacher-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["encode", str(root / "audio"), "--out", str(tmp_path), "--model", str(root / "model"),
              "--teacher-random-init", "--num-quantizers", "9"])
    assert "--num-quantizers 9 must be in [1, 5]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["encode", str(root / "audio"), "--out", str(tmp_path), "--model", str(root / "model"),
              "--teacher-random-init", "--overlap-seconds", "0.5"])
    assert "--overlap-seconds 0.5 is too short" in capsys.readouterr().err


def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "flexitrain.codec_cli", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "flexitrain-codec" in out.stdout and "encode" in out.stdout
    out = subprocess.run([sys.executable, "-m", "flexitrain.codec_cli", "encode", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--num-quantizers" in out.stdout and "--format" in out.stdout
