"""SenseVoice semantic teacher: Kaldi fbank, LFR/CMVN, SAN-M encoder, loading, batching.

Parity targets:
- ``../shared/reference/sensevoice_tiny``: recorded from the official FlexiCodec code (torchaudio kaldi formula).
- ``tests/data/sensevoice_funasr_ref.safetensors``: recorded from FunASR 1.4.16 itself on random weights
  (tools/record_sensevoice_reference.py); its fbank is kaldi-native-fbank, ~1e-3 away from the torchaudio formula.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from flexitrain.audio.kaldi_fbank import kaldi_fbank
from flexitrain.audio.resample import resample, resample_lengths
from flexitrain.models.sensevoice.frontend import apply_lfr, load_am_mvn
from flexitrain.models.sensevoice.teacher import SenseVoiceLoadError, SenseVoiceTeacher

REPO = Path(__file__).resolve().parents[1]
SHARED_REF = REPO.parent / "shared" / "reference" / "sensevoice_tiny"
FUNASR_REF = REPO / "tests" / "data" / "sensevoice_funasr_ref.safetensors"
TINY_ENCODER = dict(output_size=512, attention_heads=4, linear_units=2048, num_blocks=2, tp_blocks=0, kernel_size=11,
                    sanm_shfit=0, input_layer="pe", normalize_before=True, dropout_rate=0.1)
FRONTEND = dict(fs=16000, window="hamming", n_mels=80, frame_length=25, frame_shift=10, lfr_m=7, lfr_n=6)

needs_shared = pytest.mark.skipif(not SHARED_REF.is_dir(), reason=f"shared reference {SHARED_REF} not present")


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def write_model_dir(path: Path, encoder_conf: dict, state_dict: dict, am_mvn: Path | None = None,
                    cmvn: tuple[torch.Tensor, torch.Tensor] | None = None) -> Path:
    """A local SenseVoiceSmall-style directory: config.yaml, model.pt, am.mvn (Kaldi nnet text)."""
    path.mkdir(parents=True, exist_ok=True)
    config = dict(encoder="SenseVoiceEncoderSmall", encoder_conf=encoder_conf, model="SenseVoiceSmall",
                  frontend="WavFrontend", frontend_conf=dict(FRONTEND, cmvn_file=None))
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save(dict(state_dict), path / "model.pt")
    if am_mvn is not None:
        shutil.copy(am_mvn, path / "am.mvn")
    else:
        def row(v):
            return "<LearnRateCoef> 0 [ " + " ".join(repr(float(x)) for x in v.tolist()) + " ]"
        n = cmvn[0].numel()
        (path / "am.mvn").write_text("\n".join(["<Nnet>", f"<Splice> {n} {n}", "[ 0 ]", f"<AddShift> {n} {n}", row(cmvn[0]),
                                                f"<Rescale> {n} {n}", row(cmvn[1]), "</Nnet>", ""]))
    return path


# ----------------------------------------------------------------------------------------------
# Shared reference (official FlexiCodec code, torchaudio kaldi formula)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared():
    if not SHARED_REF.is_dir():
        pytest.skip(f"shared reference {SHARED_REF} not present")
    io = load_file(str(SHARED_REF / "reference_io.safetensors"))
    sd = load_file(str(SHARED_REF / "state_dict.safetensors"))
    teacher = SenseVoiceTeacher(TINY_ENCODER, FRONTEND, load_am_mvn(SHARED_REF / "am.mvn"))
    teacher.load_funasr_state_dict(sd)
    n = len(json.loads((SHARED_REF / "reference_cases.json").read_text())["items"])
    return io, sd, teacher, n


@needs_shared
def test_shared_fbank_from_wav(shared):
    io, _, teacher, n = shared
    for i in range(n):
        fb, fl = teacher.frontend.fbank(io[f"wav_{i}"], None)
        assert fl.tolist() == [io[f"fbank_{i}"].shape[1]]
        assert maxdiff(fb, io[f"fbank_{i}"]) <= 1e-5, i


@needs_shared
def test_shared_lfr_cmvn_from_fbank(shared):
    io, _, teacher, n = shared
    for i in range(n):
        fb = io[f"fbank_{i}"]
        x, xl = teacher.frontend.lfr_cmvn(fb, torch.tensor([fb.shape[1]]))
        assert xl.tolist() == [math.ceil(fb.shape[1] / 6)]
        assert maxdiff(x, io[f"lfr_cmvn_{i}"]) <= 1e-5, i


@needs_shared
def test_shared_semantic_from_lfr_cmvn_and_end_to_end(shared):
    io, _, teacher, n = shared
    for i in range(n):
        sem, sl = teacher.encode_features(io[f"lfr_cmvn_{i}"])
        assert sem.shape == io[f"semantic_{i}"].shape and sl.tolist() == [sem.shape[-1]]
        assert maxdiff(sem, io[f"semantic_{i}"]) <= 1e-4, i
        e2e, _ = teacher(io[f"wav_{i}"][:, None])  # [B, 1, T] input
        assert maxdiff(e2e, io[f"semantic_{i}"]) <= 5e-4, i


@needs_shared
def test_shared_batched_equals_single(shared):
    io, _, teacher, n = shared
    wavs = [io[f"wav_{i}"][0] for i in range(n)]
    lengths = torch.tensor([len(w) for w in wavs])
    batch = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
    batch[1, lengths[1]:] = 0.3  # garbage in the padding must not leak into valid frames
    feats, fl = teacher.features(batch, lengths)
    sem, sl = teacher(batch, lengths)
    assert sem.shape == (n, 512, int(sl.max())) and sl.tolist() == fl.tolist()
    for i in range(n):
        single_feats, _ = teacher.features(wavs[i][None])
        assert maxdiff(feats[i, : fl[i]], single_feats[0]) <= 1e-5
        assert maxdiff(sem[i, :, : sl[i]], io[f"semantic_{i}"][0]) <= 5e-4
        single, _ = teacher(wavs[i][None])
        assert maxdiff(sem[i, :, : sl[i]], single[0]) <= 1e-4
        assert sem[i, :, sl[i]:].abs().max().item() == 0 if sl[i] < sem.shape[-1] else True


@needs_shared
def test_from_pretrained_and_strict_errors(shared, tmp_path):
    io, sd, _, _ = shared
    model_dir = write_model_dir(tmp_path / "sv", TINY_ENCODER, sd, am_mvn=SHARED_REF / "am.mvn")
    teacher = SenseVoiceTeacher.from_pretrained(model_dir)
    sem, _ = teacher(io["wav_1"])
    assert maxdiff(sem, io["semantic_1"]) <= 5e-4

    bad = dict(sd)
    del bad["encoder.encoders.0.norm2.bias"]
    bad["encoder.extra.weight"] = torch.zeros(3)
    bad["embed.weight"] = torch.zeros(17, 560)
    write_model_dir(tmp_path / "bad", TINY_ENCODER, bad, am_mvn=SHARED_REF / "am.mvn")
    with pytest.raises(SenseVoiceLoadError) as err:
        SenseVoiceTeacher.from_pretrained(tmp_path / "bad")
    msg = str(err.value)
    assert "missing keys (1): encoder.encoders.0.norm2.bias" in msg
    assert "unexpected keys (1): encoder.extra.weight" in msg
    assert "embed.weight: checkpoint (17, 560) vs model (16, 560)" in msg

    write_model_dir(tmp_path / "deep", dict(TINY_ENCODER, num_blocks=3), sd, am_mvn=SHARED_REF / "am.mvn")
    with pytest.raises(SenseVoiceLoadError, match=r"missing keys \(13\): encoder\.encoders\.1\."):
        SenseVoiceTeacher.from_pretrained(tmp_path / "deep")

    with pytest.raises(FileNotFoundError, match=r"model\.semantic_teacher\.model_dir"):
        SenseVoiceTeacher.from_pretrained(tmp_path / "does_not_exist")
    (tmp_path / "sv" / "am.mvn").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks am\.mvn"):
        SenseVoiceTeacher.from_pretrained(tmp_path / "sv")


@needs_shared
def test_teacher_is_frozen_and_stays_in_eval(shared):
    _, _, teacher, _ = shared
    parent = torch.nn.Sequential(teacher)
    parent.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    wav = torch.randn(1, 4000, requires_grad=True)
    sem, _ = teacher(wav)
    assert not sem.requires_grad
    assert set(teacher.state_dict()) == {k for k in load_file(str(SHARED_REF / "state_dict.safetensors"))
                                         if not k.startswith(("ctc.", "encoder.tp_"))}


# ----------------------------------------------------------------------------------------------
# FunASR's own implementation (recorded vectors, random weights, tp_encoders + ctc keys present)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def funasr_ref():
    if not FUNASR_REF.is_file():
        pytest.skip(f"{FUNASR_REF} missing (run tools/record_sensevoice_reference.py)")
    data = load_file(str(FUNASR_REF))
    with safe_open(str(FUNASR_REF), "pt") as f:
        info = json.loads(f.metadata()["info"])
    sd = {k[3:]: v for k, v in data.items() if k.startswith("sd.")}
    return data, info, sd


def test_funasr_from_pretrained_ignores_tp_and_ctc(funasr_ref, tmp_path):
    data, info, sd = funasr_ref
    assert any(k.startswith("encoder.tp_encoders.") for k in sd) and any(k.startswith("ctc.") for k in sd)
    model_dir = write_model_dir(tmp_path / "sv", info["encoder_conf"], sd, cmvn=(data["cmvn_shift"], data["cmvn_scale"]))
    teacher = SenseVoiceTeacher.from_pretrained(model_dir)
    assert len(teacher.encoder.encoders) == info["encoder_conf"]["num_blocks"] - 1
    assert torch.equal(teacher.frontend.cmvn_shift, data["cmvn_shift"])
    assert torch.equal(teacher.frontend.cmvn_scale, data["cmvn_scale"])


def test_funasr_encoder_and_lfr_parity(funasr_ref):
    data, info, sd = funasr_ref
    teacher = SenseVoiceTeacher(info["encoder_conf"], info["frontend_conf"], (data["cmvn_shift"], data["cmvn_scale"]))
    teacher.load_funasr_state_dict(sd)
    feats, fl = data["feats"], data["feat_lengths"]
    hidden = data["hidden_out"][:, 4:].transpose(1, 2)  # drop the prompt like FlexiCodec
    for i in range(len(fl)):  # LFR + CMVN from FunASR's own fbank equals its WavFrontend output
        fb = data[f"fbank_{i}"][None]
        x, xl = teacher.frontend.lfr_cmvn(fb, torch.tensor([fb.shape[1]]))
        assert xl.tolist() == [int(fl[i])]
        assert maxdiff(x[0], feats[i, : fl[i]]) <= 1e-5
    sem, sl = teacher.encode_features(feats, fl)  # padded batch through FunASR's masked encoder
    assert sl.tolist() == fl.tolist()
    for i in range(len(fl)):
        assert maxdiff(sem[i, :, : fl[i]], hidden[i, :, : fl[i]]) <= 1e-5
        single, _ = teacher.encode_features(feats[i : i + 1, : fl[i]])
        assert maxdiff(single[0], hidden[i, :, : fl[i]]) <= 1e-5


def test_funasr_end_to_end_with_kaldi_native_fbank_tolerance(funasr_ref):
    data, info, sd = funasr_ref
    teacher = SenseVoiceTeacher(info["encoder_conf"], info["frontend_conf"], (data["cmvn_shift"], data["cmvn_scale"]))
    teacher.load_funasr_state_dict(sd)
    wav, lengths, fl = data["wav"], data["wav_lengths"], data["feat_lengths"]
    assert lengths.min() < 400  # one clip is shorter than a frame: FunASR shrinks frame_length
    for i in range(len(lengths)):  # FunASR's fbank here is kaldi-native-fbank: ~1e-3 from the torchaudio formula
        fb, _ = teacher.frontend.fbank(wav[i : i + 1, : lengths[i]], None)
        assert maxdiff(fb[0], data[f"fbank_{i}"]) <= 5e-3
    sem, sl = teacher(wav, lengths)
    assert sl.tolist() == fl.tolist()
    hidden = data["hidden_out"][:, 4:].transpose(1, 2)
    for i in range(len(fl)):
        assert maxdiff(sem[i, :, : fl[i]], hidden[i, :, : fl[i]]) <= 5e-4


# ----------------------------------------------------------------------------------------------
# Front-end units
# ----------------------------------------------------------------------------------------------
def _fbank_float64(x: np.ndarray, window: str) -> np.ndarray:
    """Independent float64 numpy statement of the Kaldi fbank (25/10 ms, 16 kHz, 80 bins, snip_edges)."""
    frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160].astype(np.float64)
    frames = frames - frames.mean(1, keepdims=True)
    frames = frames - 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], 1)
    n = np.arange(400)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / 399)
    frames = frames * (hann ** 0.85 if window == "povey" else 0.54 - 0.46 * np.cos(2 * np.pi * n / 399))
    power = np.abs(np.fft.rfft(frames, 512)) ** 2
    mel = lambda f: 1127.0 * np.log(1 + f / 700.0)  # noqa: E731
    edges = np.linspace(mel(20.0), mel(8000.0), 82)
    fm = mel(np.arange(257) * 16000 / 512)
    banks = np.maximum(0, np.minimum((fm - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None]),
                                     (edges[2:, None] - fm) / (edges[2:, None] - edges[1:-1, None])))
    banks[:, 256] = 0
    return np.log(np.maximum(power @ banks.T, np.finfo(np.float32).eps))


@pytest.mark.parametrize("window", ["hamming", "povey"])
def test_kaldi_fbank_matches_float64_statement(window):
    x = np.random.default_rng(0).standard_normal(4321).astype(np.float32) * 3000
    fb, fl = kaldi_fbank(torch.from_numpy(x), window_type=window)
    ref = _fbank_float64(x, window)
    assert fl.tolist() == [ref.shape[0]] == [1 + (4321 - 400) // 160]
    assert maxdiff(fb[0].double(), torch.from_numpy(ref)) <= 1e-3


def test_kaldi_fbank_batch_short_clip_dither_and_errors():
    g = torch.Generator().manual_seed(1)
    wav = torch.randn(3, 5000, generator=g) * 1000
    lengths = torch.tensor([5000, 3333, 250])
    fb, fl = kaldi_fbank(wav, lengths)
    assert fl.tolist() == [29, 19, 1]  # 1 + (N - 400) // 160; the 250-sample clip gets one shrunk frame
    assert fb[1, 19:].abs().max() == 0 and fb[2, 1:].abs().max() == 0
    for i in range(3):
        single, _ = kaldi_fbank(wav[i, : lengths[i]])
        assert maxdiff(fb[i, : fl[i]], single[0]) <= 1e-5
    with pytest.raises(ValueError, match="shorter than one frame"):
        kaldi_fbank(wav, lengths, shrink_short=False)
    torch.manual_seed(0)
    d1, _ = kaldi_fbank(wav[:1], dither=1.0)
    d2, _ = kaldi_fbank(wav[:1], dither=1.0)
    assert 0 < maxdiff(d1, d2) < 1.0 and maxdiff(d1, fb[:1]) > 0
    with pytest.raises(ValueError, match=r"\[2, 5000\]"):
        kaldi_fbank(wav, torch.tensor([5000, 1, 10]))
    with pytest.raises(ValueError, match="expects wav"):
        kaldi_fbank(wav[None])


def test_apply_lfr_index_rule():
    for frames in (1, 5, 6, 7, 13):
        fb = torch.arange(frames, dtype=torch.float32)[None, :, None]
        x, xl = apply_lfr(fb, torch.tensor([frames]))
        assert xl.item() == math.ceil(frames / 6)
        expected = [[min(max(6 * j - 3 + k, 0), frames - 1) for k in range(7)] for j in range(xl.item())]
        assert x[0].tolist() == expected


def test_load_am_mvn_errors(tmp_path):
    p = tmp_path / "am.mvn"
    p.write_text("<Nnet>\n<AddShift> 2 2\n<LearnRateCoef> 0 [ 1.5 -2 ]\n</Nnet>\n")
    with pytest.raises(ValueError, match="<Rescale>"):
        load_am_mvn(p)
    with pytest.raises(FileNotFoundError):
        load_am_mvn(tmp_path / "nope.mvn")


# ----------------------------------------------------------------------------------------------
# Resampling helper
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["soxr", "torch"])
def test_resample_sine(backend):
    t = torch.arange(22050) / 22050
    x = torch.stack([torch.sin(2 * math.pi * 440 * t), torch.sin(2 * math.pi * 1000 * t)])
    y = resample(x, 22050, 16000, backend=backend)
    assert y.shape == (2, 16000)
    t2 = torch.arange(16000) / 16000
    ref = torch.stack([torch.sin(2 * math.pi * 440 * t2), torch.sin(2 * math.pi * 1000 * t2)])
    assert maxdiff(y[:, 200:-200], ref[:, 200:-200]) <= 2e-3
    assert resample_lengths(torch.tensor([22050, 1000]), 22050, 16000).tolist() == [16000, 726]
    assert resample(x, 16000, 16000) is x
