#!/usr/bin/env python
"""Record small SenseVoice reference vectors from FunASR itself (for tests/test_sensevoice.py).

Run in a SEPARATE venv that has FunASR (flexitrain never imports funasr):

    python3 -m venv /tmp/funasr-venv
    /tmp/funasr-venv/bin/pip install torch==2.13.0 funasr==1.4.16 kaldi-native-fbank safetensors
    /tmp/funasr-venv/bin/python tools/record_sensevoice_reference.py \
        --am-mvn ../shared/reference/sensevoice_tiny/am.mvn --out tests/data/sensevoice_funasr_ref.safetensors

What it runs (all CPU, float32, eval mode, dither 0):
1. ``funasr.models.sense_voice.model.SenseVoiceSmall`` (FunASR's own class, not FlexiCodec's copy) with a
   reduced encoder (input 560, d 64, 4 heads, FFN 96, num_blocks 3, tp_blocks 1, kernel 11, vocab 32) so the
   file stays small; ``tp_blocks=1`` and ``ctc`` keep the keys a loader has to ignore. Weights: constructor
   init under ``torch.manual_seed(SEED)``, then ``p += 0.05 * N(0,1)`` for every parameter in
   ``named_parameters()`` order (generator seeded ``SEED + 12345``).
2. Three synthetic 16 kHz clips of different lengths (20000, 13001 and 350 samples; the last is shorter than
   one 25 ms frame, so FunASR shrinks ``frame_length``).
3. ``funasr.frontends.wav_frontend.WavFrontend(cmvn_file=am.mvn, n_mels=80, frame_length=25, frame_shift=10,
   lfr_m=7, lfr_n=6, window='hamming', dither=0.0)`` on the padded batch with lengths. Without torchaudio,
   FunASR's fbank is kaldi-native-fbank (``funasr.utils.fbank``), which differs from the torchaudio formula
   by up to ~7e-4; the raw per-item fbank (``funasr.utils.fbank.fbank`` with WavFrontend's kwargs) is stored too.
4. The SenseVoice prompt exactly as ``SenseVoiceSmall.inference`` builds it (embed ids 0 "auto", 1, 2, 15
   "woitn"), then ``model.encoder(speech, lengths)`` on the padded batch; ``hidden_out`` is captured by a
   forward hook on ``encoder.after_norm`` (FlexiCodec's tap, before ``tp_encoders``).

Stored tensors: ``sd.<key>`` (the full FunASR state dict), ``wav [3, N]``, ``wav_lengths``,
``fbank_<i> [F_i, 80]``, ``feats [3, T, 560]``, ``feat_lengths``, ``hidden_out [3, T+4, 64]``,
``cmvn_shift``/``cmvn_scale`` (from am.mvn); the metadata ``info`` (JSON) has the config and versions.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

SEED = 7
ENCODER_CONF = dict(output_size=64, attention_heads=4, linear_units=96, num_blocks=3, tp_blocks=1, dropout_rate=0.1,
                    positional_dropout_rate=0.1, attention_dropout_rate=0.1, input_layer="pe",
                    pos_enc_class="SinusoidalPositionEncoder", normalize_before=True, kernel_size=11, sanm_shfit=0,
                    selfattention_layer_type="sanm")
FRONTEND_CONF = dict(fs=16000, window="hamming", n_mels=80, frame_length=25, frame_shift=10, lfr_m=7, lfr_n=6)
LENGTHS = (20000, 13001, 350)


def make_wavs() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(SEED)
    out = np.zeros((len(LENGTHS), max(LENGTHS)), dtype=np.float32)
    for i, n in enumerate(LENGTHS):
        t = np.arange(n) / 16000.0
        f0 = 120.0 + 80.0 * i + 60.0 * t  # gliding harmonic tone + noise, amplitude ~0.3
        tone = sum(np.sin(2 * math.pi * k * np.cumsum(f0) / 16000.0) / k for k in range(1, 6))
        out[i, :n] = 0.1 * tone + 0.02 * rng.standard_normal(n)
    return torch.from_numpy(out), torch.tensor(LENGTHS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--am-mvn", required=True)
    ap.add_argument("--out", default="tests/data/sensevoice_funasr_ref.safetensors")
    args = ap.parse_args()

    import funasr
    from funasr.frontends.wav_frontend import WavFrontend, load_cmvn
    from funasr.models.sense_voice.model import SenseVoiceSmall
    from funasr.utils import fbank as funasr_fbank
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    model = SenseVoiceSmall(encoder="SenseVoiceEncoderSmall", encoder_conf=dict(ENCODER_CONF), input_size=560, vocab_size=32)
    gen = torch.Generator().manual_seed(SEED + 12345)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p += 0.05 * torch.randn(p.shape, generator=gen)
    model.eval()

    wav, lengths = make_wavs()
    frontend = WavFrontend(cmvn_file=args.am_mvn, dither=0.0, **FRONTEND_CONF).eval()
    fbanks = {}
    for i, n in enumerate(LENGTHS):  # the raw fbank WavFrontend computes internally
        x = wav[i, :n] * (1 << 15)
        fbanks[f"fbank_{i}"] = funasr_fbank.fbank(
            x.unsqueeze(0), num_mel_bins=80, frame_length=min(25, n / 16000 * 1000), frame_shift=10, dither=0.0,
            energy_floor=0.0, window_type="hamming", sample_frequency=16000, snip_edges=True).float().contiguous()
    with torch.no_grad():
        feats, feat_lengths = frontend(wav.clone(), lengths.clone())
        speech, speech_lengths = feats.clone(), feat_lengths.clone()
        b = speech.size(0)
        language_query = model.embed(torch.LongTensor([[model.lid_dict["auto"]]])).repeat(b, 1, 1)
        textnorm_query = model.embed(torch.LongTensor([[model.textnorm_dict["woitn"]]])).repeat(b, 1, 1)
        speech = torch.cat((textnorm_query, speech), dim=1)
        event_emo_query = model.embed(torch.LongTensor([[1, 2]])).repeat(b, 1, 1)
        speech = torch.cat((torch.cat((language_query, event_emo_query), dim=1), speech), dim=1)
        speech_lengths = speech_lengths + 4
        captured = []
        hook = model.encoder.after_norm.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
        model.encoder(speech, speech_lengths)
        hook.remove()
    assert len(captured) == 1, "after_norm should run once per encoder call"
    cmvn = load_cmvn(args.am_mvn)

    tensors = {f"sd.{k}": v.detach().float().contiguous() for k, v in model.state_dict().items()}
    tensors.update(wav=wav, wav_lengths=lengths, feats=feats.float().contiguous(), feat_lengths=feat_lengths.long(),
                   hidden_out=captured[0].contiguous(), cmvn_shift=cmvn[0].contiguous(), cmvn_scale=cmvn[1].contiguous(),
                   **fbanks)
    info = dict(funasr=funasr.__version__, torch=torch.__version__, seed=SEED, encoder_conf=ENCODER_CONF,
                frontend_conf=FRONTEND_CONF, input_size=560, vocab_size=32, lengths=list(LENGTHS),
                feat_lengths=feat_lengths.tolist(), prompt_ids=[0, 1, 2, 15],
                fbank_backend="kaldi-native-fbank" if not funasr_fbank._HAS_TORCHAUDIO else "torchaudio",
                init="torch.manual_seed(seed); SenseVoiceSmall(...); p += 0.05*randn(generator seed+12345) in named_parameters() order")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out, metadata={"info": json.dumps(info)})
    print(f"wrote {args.out}: {len(tensors)} tensors, {Path(args.out).stat().st_size / 1e6:.2f} MB, feat_lengths {feat_lengths.tolist()}")


if __name__ == "__main__":
    main()
