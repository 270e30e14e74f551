"""The NAR sampled for several utterances at once (`flow_sampling.sample_mel_batch`, `TTSPipeline.synthesize_batch`):
each utterance equals its own one-at-a-time result, a leak through the padding is caught, and each Euler step is
one velocity-model call for the whole chunk.

Tolerance: `tolerances.check_network`, |Δ| ≤ 256 EPS·max|ref| per utterance. The batched call feeds the model the
same rows padded to a longer, wider batch: the matmuls block differently and the attention's softmax sums over
more (masked, exactly zero-weight) keys, so each op may round differently by ~EPS/2 of its output; the masked
guidance std sums in another order too. Measured ≤ 0.6 EPS·max after 4 guided steps (noise-dominated mels of
|x| ~ 4), also with noise in the padding. A mask that lets padded frames through moves the outputs past the bound:
6–540× with the sampler's own zero padding (a zero frame is a near-zero key of this tiny model, but it still takes
a share of the softmax), 68–480× with noise in the padding.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import requires_espeak
from flexitrain.models.tts.flow_sampling import sample_mel, sample_mel_batch
from flexitrain.models.tts.voicebox import TINY_CONFIG, VoiceboxNAR
from tolerances import EPS, check_network

pytestmark = pytest.mark.usefixtures("one_thread")

N_STEPS = 4
PROMPT_FRAMES = [8, 4, 12]  # mel frames of each utterance's prompt (its cond has as many)


@pytest.fixture(scope="module")
def vb():
    torch.manual_seed(0)
    return VoiceboxNAR.from_config(TINY_CONFIG).eval().voicebox_model


@pytest.fixture(scope="module")
def utterances(vb):
    """Three utterances of different lengths: (cond [T, H], prompt mel [P, mel]); the last prompt mel is one frame
    longer than its codes (cut to them, as in `sample_mel`)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for n_codes, n_prompt in zip((7, 3, 5), PROMPT_FRAMES):
        cond = vb.embed_codes(torch.randint(0, 1024, (1, n_codes + n_prompt // 4), generator=g))[0]
        out.append((cond, torch.randn(n_prompt + (n_prompt == 12), 128, generator=g)))
    return out


def _one_at_a_time(vb, utterances, with_prompt: bool, cfg: float) -> list[torch.Tensor]:
    return [sample_mel(vb, cond[None], prompt[None] if with_prompt else None,
                       prompt_cond_frames=n if with_prompt else None, n_timesteps=N_STEPS, cfg=cfg, seed=b)[0]
            for b, ((cond, prompt), n) in enumerate(zip(utterances, PROMPT_FRAMES))]


def _batched(model, utterances, with_prompt: bool, cfg: float) -> list[torch.Tensor]:
    return sample_mel_batch(model, [c for c, _ in utterances], [p for _, p in utterances] if with_prompt else None,
                            prompt_cond_frames=PROMPT_FRAMES if with_prompt else None, n_timesteps=N_STEPS,
                            cfg=cfg, seeds=[0, 1, 2])


@pytest.mark.parametrize("with_prompt", [False, True])
@pytest.mark.parametrize("cfg", [2.0, 0.0])
def test_batched_sampler_equals_one_at_a_time(vb, utterances, with_prompt, cfg):
    alone = _one_at_a_time(vb, utterances, with_prompt, cfg)
    together = _batched(vb, utterances, with_prompt, cfg)
    assert [x.shape for x in together] == [x.shape for x in alone]
    assert len({x.shape[0] for x in alone}) == 3  # really different lengths: there is padding to hide
    for b, (ours, ref) in enumerate(zip(together, alone)):
        check = check_network(ours, ref, f"utterance {b}")
        assert check.ok, str(check)


class _Masked(nn.Module):
    """The velocity model behind a test hook: padded frames (mask 0) filled with large noise (``fill``), and the
    key padding mask passed on as given, dropped (``"absent"``) or letting one more frame per row through."""

    def __init__(self, model: nn.Module, mask: str = "right", fill: bool = False):
        super().__init__()
        self.model, self.mask, self.fill, self.mel_dim = model, mask, fill, model.mel_dim

    def forward(self, x, t, cond, x_mask):
        if self.fill:
            g = torch.Generator().manual_seed(0)
            pad = ~x_mask.bool()[..., None]
            x = torch.where(pad, 10 * torch.randn(x.shape, generator=g), x)
            cond = torch.where(pad, 10 * torch.randn(cond.shape, generator=g), cond)
        if self.mask == "absent":
            x_mask = None
        elif self.mask == "one frame too long":
            x_mask = torch.cat([torch.ones_like(x_mask[:, :1]), x_mask[:, :-1]], dim=1)
        return self.model(x, t, cond, x_mask)


@pytest.mark.parametrize("with_prompt", [False, True])
def test_padding_content_does_not_reach_real_frames(vb, utterances, with_prompt):
    alone = _one_at_a_time(vb, utterances, with_prompt, 2.0)
    together = _batched(_Masked(vb, fill=True), utterances, with_prompt, 2.0)
    for b, (ours, ref) in enumerate(zip(together, alone)):
        check = check_network(ours, ref, f"utterance {b}")
        assert check.ok, str(check)


@pytest.mark.parametrize("fill", [False, True])
@pytest.mark.parametrize("mask", ["absent", "one frame too long"])
@pytest.mark.parametrize("with_prompt", [False, True])
def test_a_wrong_padding_mask_fails_the_tolerance(vb, utterances, with_prompt, mask, fill):
    alone = _one_at_a_time(vb, utterances, with_prompt, 2.0)
    together = _batched(_Masked(vb, mask, fill), utterances, with_prompt, 2.0)
    longest = max(range(3), key=lambda b: alone[b].shape[0] + (PROMPT_FRAMES[b] if with_prompt else 0))
    for b in range(3):
        if b == longest and not with_prompt:
            continue  # the longest row without a prompt has no padding in either layout: nothing leaks into it
        check = check_network(together[b], alone[b], f"utterance {b}")
        # measured 6–540× the bound with zero padding, 68–480× with noise in it (module docstring)
        assert not check.ok and check.worst > (30 if fill else 1), str(check)


def test_given_noise_and_bad_arguments(vb, utterances):
    conds = [c for c, _ in utterances]
    noises = [torch.randn(c.shape[0], 128) for c in conds]
    out = sample_mel_batch(vb, conds, noises=noises, n_timesteps=2)
    for cond, noise, x in zip(conds, noises, out):
        check = check_network(x, sample_mel(vb, cond[None], noise=noise[None], n_timesteps=2)[0])
        assert check.ok, str(check)
    assert sample_mel_batch(vb, []) == []
    with pytest.raises(ValueError, match="seeds has 2 entries for 3 conds"):
        sample_mel_batch(vb, conds, seeds=[0, 1])
    with pytest.raises(ValueError, match=r"noises\[0\] must be"):
        sample_mel_batch(vb, conds, noises=[n[:-1] for n in noises])
    with pytest.raises(ValueError, match="nothing left to generate"):
        sample_mel_batch(vb, conds, [torch.zeros(c.shape[0], 128) for c in conds])


def test_one_model_call_per_euler_step_for_the_whole_batch(vb, utterances):
    calls = []
    hook = vb.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        _batched(vb, utterances, True, 2.0)
        assert calls == [6] * N_STEPS  # 3 conditional + 3 unconditional rows per call
        calls.clear()
        _batched(vb, utterances, True, 0.0)
        assert calls == [3] * N_STEPS
    finally:
        hook.remove()


# ------------------------------------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def modules():
    from test_tts_pipeline import _modules

    return _modules()


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory):
    import numpy as np
    import soundfile as sf

    t = np.arange(int(1.3 * 22050)) / 22050
    path = tmp_path_factory.mktemp("prompt") / "prompt.wav"
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 22050)
    return path


def _greedy(modules, **nar):
    from flexitrain.models.tts.sampling import SamplingConfig
    from flexitrain.tts import TTSPipeline
    from flexitrain.tts.pipeline import NARConfig

    # greedy AR decoding: the batched decode gives each utterance its own tokens, so only the NAR can differ
    return TTSPipeline(*modules, sampling=SamplingConfig(top_k=1, duration_top_k=1, min_token_text_ratio=0.3,
                                                         max_token_text_ratio=0.6),
                       nar_config=NARConfig(n_timesteps=2, **nar))


class _Record:
    """Forward hooks: the batch size of every velocity-model call and the mel every vocoder call renders."""

    def __init__(self, tts):
        self.calls, self.mels = [], []
        self.hooks = [tts.nar.voicebox_model.register_forward_hook(lambda m, a, o: self.calls.append(a[0].shape[0])),
                      tts.vocoder.register_forward_hook(lambda m, a, o: self.mels.append(a[0][0].T.clone()))]

    def remove(self):
        for h in self.hooks:
            h.remove()


@requires_espeak
def test_synthesize_batch_samples_the_chunk_together_and_equals_one_at_a_time(modules, prompt_wav):
    from flexitrain.tts import TTSRequest

    tts = _greedy(modules, batch=True)  # the default on the CPU is per utterance (checked below)
    requests = [TTSRequest("One two three.", prompt_wav, "A prompt.", frame_rate=8.3, seed=1),
                TTSRequest("Four five.", prompt_wav, "", frame_rate=8.3, seed=5, ar_only=True),
                TTSRequest("Five six seven eight nine ten.", prompt_wav, "", frame_rate=6.25, seed=2),
                TTSRequest("Eleven.", prompt_wav, "Another prompt text.", threshold=0.91, seed=3)]
    rec = _Record(tts)
    try:
        out = tts.synthesize_batch(requests, max_batch=4)
        # one chunk: n_timesteps calls, each on the 3 NAR utterances' conditional + unconditional rows (the
        # AR-only one goes to the codec decoder)
        assert rec.calls == [6] * 2
        batch_mels = rec.mels
        rec.calls, rec.mels = [], []
        alone = [tts.synthesize_request(r) for r in requests]
        assert rec.calls == [2] * 6  # one-at-a-time: per utterance
        alone_mels, rec.calls, rec.mels = rec.mels, [], []
        default = _greedy(modules).synthesize_batch(requests, max_batch=4)
        assert rec.calls == [2] * 6  # NARConfig.batch=None on the CPU: per utterance too
    finally:
        rec.remove()
    assert out[1].mode == "ar-only" and torch.equal(out[1].audio, alone[1].audio) and "nar" not in out[1].timings
    assert len(batch_mels) == len(alone_mels) == 3
    for b, (ours, ref) in enumerate(zip(batch_mels, alone_mels)):
        check = check_network(ours, ref, f"mel {b}")
        assert check.ok, str(check)
    for i in (0, 2, 3):
        assert torch.equal(out[i].tokens, alone[i].tokens) and torch.equal(out[i].durations, alone[i].durations)
        assert out[i].audio.shape == alone[i].audio.shape
        # Vocos run per utterance on those mels: measured ≤ 0.5 EPS·max on the mels, ≤ 6 EPS·max on the audio
        # (this random vocoder's output is ~50× smaller than its input), within the same network bound
        check = check_network(out[i].audio, alone[i].audio, f"audio {i}")
        assert check.ok, str(check)
        assert set(out[i].timings) == {"prompt", "ar", "nar", "vocoder", "total"}
        assert torch.equal(default[i].audio, alone[i].audio)  # the per-utterance path is the same code
    # one NAR run for the chunk, its time shared evenly like the AR's
    assert out[0].timings["nar"] == out[2].timings["nar"] == out[3].timings["nar"] > 0
    assert abs(out[0].timings["total"] - sum(v for k, v in out[0].timings.items() if k != "total")) < 1e-9
    assert batch_mels[0].abs().max() > 1e3 * EPS  # real mels, not zeros


@requires_espeak
def test_compile_option_wraps_the_velocity_model_once(modules, prompt_wav, monkeypatch):
    from flexitrain.tts import TTSRequest

    compiled = []

    def fake_compile(model, **kwargs):  # the wiring only: a real compile takes minutes on a CPU runner
        compiled.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert not _greedy(modules).nar_config.compile  # off by default
    tts = _greedy(modules, compile=True, batch=True)
    requests = [TTSRequest("One two.", prompt_wav, frame_rate=8.3, seed=1),
                TTSRequest("Three.", prompt_wav, frame_rate=8.3, seed=2)]
    tts.synthesize_batch(requests)
    tts.synthesize_request(requests[0])
    assert compiled == [{"dynamic": True}]
