"""The 24 kHz / 50 Hz NAR + Vocos mel front end against the official reference (shared/reference/mel24k)."""
import pytest
import torch

from flexitrain.audio.mel24k import Mel24k, denormalize_mel, mel24k, mel_frames, normalize_mel
from flexitrain.audio.resample import resample


@pytest.fixture(scope="module")
def ref(shared_reference):
    from safetensors.torch import load_file

    d = shared_reference / "mel24k"
    return load_file(str(d / "reference_io.safetensors")), load_file(str(d / "state_dict.safetensors"))


def test_filterbank_and_window_match_official(ref):
    _, sd = ref
    m = Mel24k()
    torch.testing.assert_close(m.mel_basis, sd["mel_basis"], atol=1e-6, rtol=0)
    torch.testing.assert_close(m.hann_window, sd["hann_window"], atol=1e-6, rtol=0)
    assert "mel_basis" not in m.state_dict()  # derived buffers stay out of checkpoints


def test_logmel_and_normalised_mel_match_official(ref):
    io, _ = ref
    m = Mel24k()
    torch.testing.assert_close(m.log_mel(io["wav_24k_from_in"]), io["logmel_24k_from_in"], atol=5e-4, rtol=0)
    torch.testing.assert_close(m(io["wav_24k_from_in"]), io["mel_24k_from_in"], atol=2e-4, rtol=0)
    torch.testing.assert_close(m(io["wav_24k_from_16k"]), io["mel_24k_from_16k"], atol=2e-4, rtol=0)
    assert m(io["wav_24k_from_in"]).shape[-1] == io["wav_24k_from_in"].shape[-1] // 480


def test_training_path_16k_to_mel_matches_official(ref):
    io, _ = ref
    wav24 = resample(io["wav_16k"][None], 16000, 24000, backend="torch")  # torchaudio's kernel
    torch.testing.assert_close(wav24, io["wav_24k_from_16k"], atol=1e-5, rtol=0)
    mel, n = mel24k(io["wav_16k"][None], 16000, lengths=torch.tensor([io["wav_16k"].shape[0]]))
    # 1e-7 resampling differences grow near the 1e-5 log clamp of the empty band above 8 kHz.
    torch.testing.assert_close(mel, io["mel_24k_from_16k"], atol=1e-3, rtol=0)
    assert int(n) == mel.shape[-1] == 127


def test_frame_counts_in_true_units():
    assert mel_frames(16000, 16000) == 50 and mel_frames(24000, 24000) == 50
    assert mel_frames(torch.tensor([20480, 16000]), 16000).tolist() == [64, 50]
    x = torch.randn(3, 128, 7)
    torch.testing.assert_close(denormalize_mel(normalize_mel(x)), x)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="mono"):
        Mel24k()(torch.zeros(1, 2, 4800))
    with pytest.raises(ValueError, match="too short"):
        Mel24k()(torch.zeros(1, 300))
