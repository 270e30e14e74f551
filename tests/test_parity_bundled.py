"""Parity with the official FlexiCodec code on the vectors bundled in the repository (``tests/data/parity``).

The vectors were recorded by ``tools/record_parity_vectors.py`` from ``flexicodec==0.1.2`` (byte-identical to
AmphionTeam/FlexiCodec @ f52415cc; ``tests/data/parity/README.md`` and ``manifest.json`` say what ran). They cover
the codec (a merged-frame case, a case where the max-tokens cap splits a run), the SenseVoice front end and
encoder, the AR TTS model (teacher forcing, greedy decoding, text front end), the Voicebox NAR (estimator, sampler,
training objective), the Vocos vocoder and the 24 kHz mel with its resampling. Nothing here needs ``../shared``:
a fresh clone runs every test (the text front end needs espeak-ng / openai-whisper, like test_text_frontend.py).

How the bounds are derived
--------------------------
* Integer outputs (codes, token lengths, greedy tokens and durations, RNG-driven prompt lengths) must be equal.
  That is safe because none of the recorded decisions is near its edge: the recording checked that every
  merge similarity is >= 1e-3 from its threshold, that the codes do not change when the inputs are perturbed by
  1e-5 relative noise (~100x float32 rounding), that greedy logit margins are >= 0.1, and that a float64 rerun
  takes the same decisions (``test_recorded_decisions_are_not_on_a_knife_edge`` re-reads those facts).
* Float outputs: next to each output the recorder stored ``fp64_dev``, the max |difference| between the official
  float32 output and a float64 rerun of the same official code on the same inputs, i.e. the size of float32
  rounding in that very computation (it already includes how much the network amplifies rounding). Our port is
  another float32 evaluation of the same formula in a different operation order (and possibly another MKL code
  path); its rounding error is of the same size and independent, so |ours - official| is about 2 x fp64_dev and
  exceeds 8 x fp64_dev only for pathological summation orders. The bound is ``SAFETY = 32`` x fp64_dev, with a
  floor of 8 ulp of the largest value for outputs that the float64 rerun reproduced to the last bit. Measured
  |ours - official| is <= 0.09 of every bound under all MKL / ATen CPU paths tried, while a 0.1% error in one
  layer's weights already exceeds its bound (~5x) and a wrong constant, window or frame offset exceeds the
  log-spectral bounds 20-8000x (the tests at the end).
* Log-spectral features (Kaldi log-fbank, 24 kHz log-mel) are compared in the amplitude domain, normalised per
  frame: ``max |exp(a/p) - exp(b/p)| / max(frame peak of exp(b/p), floor amplitude)`` with p = 2 for the power
  fbank and p = 1 for the magnitude mel. The FFT's float32 error is proportional to the norm of the whole frame
  (~ u log2(n_fft) ||X||), not to each bin, so in the log domain it is magnified by peak/bin: bins 40 dB under the
  frame peak or clamped at the log floor (-15.94 for the fbank, log 1e-5 for the mel) legitimately differ by
  1e-4..1e-3 between MKL code paths (seen on an AVX-512 Xeon: 3.65e-4 log-mel, 1.57e-4 log-fbank), while in the
  normalised amplitude domain every bin's error is bounded by the same ~1e-6. Same rule: 32 x the recorded
  float64 deviation of that measure.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "parity"
EPS = torch.finfo(torch.float32).eps  # 2^-23: one ulp at 1.0
SAFETY = 32   # bound = SAFETY x (official float32 - float64) deviation; see the module docstring
FLOOR_ULPS = 8
FBANK_FLOOR = EPS  # Kaldi floors mel energies (power) at float32 eps before the log
MEL_FLOOR = 1e-5  # the 24 kHz mel clamps mel magnitudes at 1e-5 before the log
MEL_MEAN, MEL_VAR = -4.92, 8.14

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def component(name: str, state: str | None = "state_dict.safetensors", io: str = "io.safetensors",
              cases: str = "cases.json"):
    d = DATA / name
    spec = json.loads((d / cases).read_text())
    return spec, load_file(str(d / io)), (load_file(str(d / state)) if state else None)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def bound(info: dict, key: str = "fp64_dev") -> float:
    """SAFETY x the official output's float32-vs-float64 deviation, at least FLOOR_ULPS ulp of its largest value."""
    return max(SAFETY * info[key], FLOOR_ULPS * EPS * info.get("absmax", 1.0))


def amp_error(ours_log: torch.Tensor, ref_log: torch.Tensor, power: int, floor: float) -> float:
    """Frame-normalised amplitude error of log features (bins on the last axis, frames on the others)."""
    assert ours_log.shape == ref_log.shape, (tuple(ours_log.shape), tuple(ref_log.shape))
    a = torch.exp(ours_log.double() / power)
    b = torch.exp(ref_log.double() / power)
    peak = b.amax(-1, keepdim=True).clamp(min=floor ** (1 / power))
    return float(((a - b).abs() / peak).max())


def denorm(mel: torch.Tensor) -> torch.Tensor:
    return mel * math.sqrt(MEL_VAR) + MEL_MEAN


def frames_last(mel: torch.Tensor) -> torch.Tensor:
    """[1, 128, T] -> [T, 128]: bins on the last axis for amp_error."""
    return mel[0].transpose(0, 1)


# ----------------------------------------------------------------------------------------------------------------
# the bundle itself
# ----------------------------------------------------------------------------------------------------------------
def test_bundle_names_the_official_code_and_stays_small():
    manifest = json.loads((DATA / "manifest.json").read_text())
    official = manifest["official"]
    assert official["package"] == "flexicodec" and official["version"] == "0.1.2"
    assert official["repo"] == "AmphionTeam/FlexiCodec"
    assert official["commit"] == "f52415cc043cf8bd6bcd65921edb8bb4241cf54a"
    assert official["file_sha256"]["flexicodec/modeling_flexicodec.py"]
    readme = (DATA / "README.md").read_text()
    assert official["commit"] in readme and "record_parity_vectors.py" in readme
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total <= 5_000_000, f"bundled parity vectors are {total / 1e6:.2f} MB (budget 5 MB)"
    for name, files in manifest["sizes_bytes"].items():
        for f, n in files.items():
            assert (DATA / name / f).stat().st_size == n, f"{name}/{f} differs from the recording"


def test_recorded_decisions_are_not_on_a_knife_edge():
    """Why integer outputs may be compared exactly (facts measured at recording time)."""
    spec = json.loads((DATA / "codec" / "reference_cases.json").read_text())
    for case in spec["cases"]:
        assert case["min_abs_similarity_minus_threshold"] >= 1e-3, case["key"]
        assert case["codes_unchanged_under_1e-5_input_noise_x8"] and case["fp64_rerun_same_codes"], case["key"]
    inf = json.loads((DATA / "ar_tts" / "cases.json").read_text())["inference"]
    assert inf["min_top1_top2_token_logit_gap"] >= 0.05 and inf["min_top1_top2_duration_logit_gap"] >= 0.05
    assert inf["fp64_rerun_same_tokens_and_durations"]


# ----------------------------------------------------------------------------------------------------------------
# codec
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def codec():
    from flexitrain.models.codec.checkpoint import load_state_dict_strict
    from flexitrain.models.codec.flexicodec import FlexiCodec

    spec, io, state = component("codec", "official_state_dict.safetensors", "reference_io.safetensors",
                                "reference_cases.json")
    torch.manual_seed(spec["seed"])
    model = FlexiCodec(**spec["config"])
    load_state_dict_strict(model, state)
    return spec, io, state, model.eval()


def test_codec_cases_cover_merging_and_the_max_tokens_cap(codec):
    spec = codec[0]
    cap = spec["config"]["max_tokens_per_group"]
    merged = [c for c in spec["cases"] if c["groups"] < c["frames"]]
    capped = [c for c in spec["cases"] if c["groups_without_max_tokens_cap"] < c["groups"]]
    assert merged and capped and all(max(c["token_lengths"]) <= cap for c in spec["cases"])
    assert any(c["num_quantizers"] == 1 for c in spec["cases"])  # no acoustic codes
    assert any(c["num_quantizers"] is None for c in spec["cases"])  # all codebooks


@pytest.mark.parametrize("masked", [False, True], ids=["official_path", "padding_masks"])
def test_codec_matches_official(codec, masked):
    """Codes and token lengths exact; audio_out within SAFETY x its float64 deviation (~3e-6 on |audio| <= 0.2:
    a DAC decoder, a transformer and two aggregators in float32; the official float64 rerun moved it by ~1e-7)."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import parity
    finally:
        sys.path.pop(0)
    spec, io, _, model = codec
    for case in spec["cases"]:
        key = case["key"]
        tokens, audio = parity.run_case(model, io, case, masked)
        assert torch.equal(tokens.token_lengths.long(), io[f"{key}_token_lengths"].long()), key
        assert torch.equal(tokens.semantic_codes.long().reshape(-1),
                           io[f"{key}_semantic_codes"].long().reshape(-1)), key
        if f"{key}_acoustic_codes" in io:
            assert torch.equal(tokens.acoustic_codes.long(), io[f"{key}_acoustic_codes"].long()), key
        else:
            assert tokens.acoustic_codes is None or tokens.acoustic_codes.numel() == 0, key
        info = spec["tensors"][f"{key}_audio_out"]
        assert maxdiff(audio, io[f"{key}_audio_out"]) <= bound(info), key


def test_codec_parity_tool_on_the_bundle(capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import parity
    finally:
        sys.path.pop(0)
    assert parity.main([str(DATA / "codec"), "--threads", "1"]) == 0
    n = len(json.loads((DATA / "codec" / "reference_cases.json").read_text())["cases"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"parity: {n}/{n} cases match")


def test_codec_without_the_cap_merges_like_official(codec):
    """The cap is what splits the long run: without it our port gives the official uncapped group count."""
    from flexitrain.models.codec.checkpoint import load_state_dict_strict
    from flexitrain.models.codec.flexicodec import FlexiCodec

    spec, io, state, _ = codec
    model = FlexiCodec(**{**spec["config"], "max_tokens_per_group": None})
    load_state_dict_strict(model, state)
    model.eval()
    for case in spec["cases"]:
        tokens = model.encode(io[case["audio"]], sample_rate=16000, threshold=case["threshold"],
                              num_quantizers=case["num_quantizers"], semantic_features=io[case["semantic"]],
                              use_padding_mask=False)
        assert tokens.token_lengths.shape[-1] == case["groups_without_max_tokens_cap"], case["key"]


# ----------------------------------------------------------------------------------------------------------------
# SenseVoice front end + encoder
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sensevoice():
    from flexitrain.models.sensevoice.frontend import load_am_mvn
    from flexitrain.models.sensevoice.teacher import SenseVoiceTeacher

    spec, io, state = component("sensevoice")
    teacher = SenseVoiceTeacher(spec["encoder_conf"], spec["frontend_conf"],
                                load_am_mvn(DATA / "sensevoice" / "am.mvn"))
    teacher.load_funasr_state_dict(state)
    return spec, io, teacher


def test_sensevoice_fbank_from_wav(sensevoice):
    """Log-fbank in the frame-normalised power->amplitude domain: bound 32 x the official float32-vs-float64
    deviation of that measure (~6e-7 -> ~2e-5). The espeak item has 28 all-silent frames (every bin at the
    -15.94 floor) and faint edges; the 350-sample clip checks the shrunk frame."""
    spec, io, teacher = sensevoice
    for i, item in enumerate(spec["items"]):
        fb, fl = teacher.frontend.fbank(io[f"wav_{i}"], None)
        ref = io[f"fbank_{i}"]
        assert fl.tolist() == [item["fbank_frames"]] == [ref.shape[1]]
        info = spec["tensors"][f"fbank_{i}"]
        assert amp_error(fb, ref, 2, FBANK_FLOOR) <= bound(info, "amp_dev"), i
        # digital silence: a zero frame has exactly zero power in any arithmetic -> every bin is log(eps) = -15.94
        # (up to the 1 ulp by which log implementations may differ)
        silent = (ref <= math.log(FBANK_FLOOR) + 1e-5).all(-1)
        assert int(silent.sum()) == item["frames_at_floor"]
        assert maxdiff(fb[silent], ref[silent]) <= 2 * EPS * 16, i


def test_sensevoice_lfr_cmvn_from_fbank(sensevoice):
    """LFR is a gather (exact); CMVN is (x + shift) * scale, two float32 roundings: <= 2 ulp of the result
    (+1 ulp of |x + shift| * |scale|), bound 4 ulp of the largest value."""
    spec, io, teacher = sensevoice
    for i in range(len(spec["items"])):
        fb = io[f"fbank_{i}"]
        x, xl = teacher.frontend.lfr_cmvn(fb, torch.tensor([fb.shape[1]]))
        assert xl.tolist() == [math.ceil(fb.shape[1] / 6)]
        ref = io[f"lfr_cmvn_{i}"]
        assert maxdiff(x, ref) <= 4 * EPS * spec["tensors"][f"lfr_cmvn_{i}"]["absmax"], i


def test_sensevoice_semantic_from_lfr_cmvn_and_end_to_end(sensevoice):
    """Encoder output within 32 x its float64 deviation (from the official LFR+CMVN features: ~1e-6 on |x| <= 4);
    end to end from the waveform within 32 x the float64 deviation of the whole chain (fbank rounding included)."""
    spec, io, teacher = sensevoice
    for i in range(len(spec["items"])):
        info = spec["tensors"][f"semantic_{i}"]
        sem, sl = teacher.encode_features(io[f"lfr_cmvn_{i}"])
        assert sl.tolist() == [io[f"semantic_{i}"].shape[-1]]
        assert maxdiff(sem, io[f"semantic_{i}"]) <= bound(info, "fp64_dev_from_lfr_cmvn"), i
        e2e, _ = teacher(io[f"wav_{i}"][:, None])
        assert maxdiff(e2e, io[f"semantic_{i}"]) <= bound(info, "fp64_dev_end_to_end"), i


# ----------------------------------------------------------------------------------------------------------------
# AR TTS
# ----------------------------------------------------------------------------------------------------------------
def port_ar_config(c: dict) -> dict:
    """Official TransformerLMWrapper kwargs -> ARTTSModel kwargs."""
    assert c["text_encoder_input_size"] == c["text_encoder_output_size"] and c["llm_input_size"] == c["llm_output_size"]
    return dict(text_token_size=c["text_token_size"], speech_token_size=c["speech_token_size"],
                text_encoder_dim=c["text_encoder_output_size"], text_encoder_heads=c["text_encoder_attention_heads"],
                text_encoder_ffn=c["text_encoder_linear_units"], text_encoder_blocks=c["text_encoder_num_blocks"],
                llm_dim=c["llm_output_size"], llm_heads=c["llm_attention_heads"], llm_ffn=c["llm_linear_units"],
                llm_blocks=c["llm_num_blocks"], spk_embed_dim=c["spk_embed_dim"],
                duration_classes=c["duration_classes"], framerate_options=c["flex_framerate_options"])


@pytest.fixture(scope="module")
def ar():
    from flexitrain.models.tts.ar_checkpoint import load_ar_weights
    from flexitrain.models.tts.ar_tts import ARTTSModel

    spec, io, _ = component("ar_tts", state=None)
    model = ARTTSModel(**port_ar_config(spec["config"])).eval()
    load_ar_weights(model, DATA / "ar_tts" / "state_dict.safetensors")
    return spec, io, model


@pytest.mark.parametrize("fr", ["0.86", "0.91"])
def test_ar_teacher_forcing_matches_official(ar, fr):
    """Hidden states, logits and duration logits at valid positions within 32 x their float64 deviation
    (~1e-5 on values <= 6); padded rows of item 1 are garbage in the official code by design and are skipped.
    Losses: same rule (a mean of CE terms: its rounding is what the float64 rerun measured); accuracy is a ratio
    of integer counts: exact."""
    spec, io, model = ar
    t = spec["tensors"]
    with torch.no_grad():
        out = model(io["tf.text_token"], io["tf.text_token_len"], io["tf.speech_token"], io["tf.speech_token_len"],
                    io["tf.duration"], framerate=float(fr))
        logits = model.llm_decoder(out.lm_output)
    p = f"tf.fr{fr}."
    lengths = io[p + "lm_input_len"].long()
    assert out.lm_input_lengths.tolist() == lengths.tolist()
    for name, value in [("lm_input", out.lm_input), ("lm_output", out.lm_output), ("logits", logits)]:
        for i in range(2):
            assert maxdiff(value[i, : lengths[i]], io[p + name][i, : lengths[i]]) <= bound(
                t[p + name], "fp64_dev_valid"), name
    tl = io["tf.text_token_len"]
    for i in range(2):
        assert maxdiff(out.text_encoder_out[i, : tl[i]], io[p + "text_encoder_out"][i, : tl[i]]) <= bound(
            t[p + "text_encoder_out"])
    assert maxdiff(out.duration_logits, io[p + "duration_logits"]) <= bound(t[p + "duration_logits"])
    for mine, theirs in [(out.total_loss, "total_loss"), (out.token_loss, "loss"),
                         (out.duration_loss, "duration_loss")]:
        assert maxdiff(mine.detach(), io[p + theirs]) <= bound(t[p + theirs]), theirs
    assert float(out.accuracy) == float(io[p + "acc"])


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "recompute"])
def test_ar_greedy_decoding_matches_official(ar, use_cache):
    """Greedy tokens and durations exact (margins >= 0.1 >> rounding); per-step logits / hidden states within
    32 x their float64 deviation."""
    from flexitrain.models.tts.sampling import SamplingConfig, generate

    spec, io, model = ar
    t = spec["tensors"]
    cfg = SamplingConfig(top_k=1, duration_top_k=1, max_token_text_ratio=2.0, use_cache=use_cache)
    res = generate(model, io["inf.text"], spec["inference"]["framerate"], io["inf.prompt_text"],
                   io["inf.prompt_speech_token"], io["inf.prompt_token_lengths"], cfg, record=True)
    n = io["inf.speech_tokens"].shape[1]
    assert res.tokens.tolist() == io["inf.speech_tokens"].tolist() and not res.stopped_by_eos
    # the official loop stops one duration short at the length cap; ours predicts the last one too
    assert res.durations[:, : n - 1].tolist() == io["inf.duration_classes"].tolist() and res.durations.size(1) == n
    tr = res.trace
    assert maxdiff(tr["prefix_lm_input"], io["inf.prefix_lm_input"]) <= bound(t["inf.prefix_lm_input"])
    assert maxdiff(tr["step_logits"][:n], io["inf.step_logits"]) <= bound(t["inf.step_logits"])
    assert maxdiff(tr["step_hidden"][:n], io["inf.step_lm_output"]) <= bound(t["inf.step_lm_output"])
    assert maxdiff(tr["step_duration_logits"][: n - 1], io["inf.step_duration_logits"]) <= bound(
        t["inf.step_duration_logits"])
    with torch.no_grad():
        prefix = io["inf.prefix_lm_input"]
        out = model.llm(prefix, torch.tensor([prefix.size(1)]))
    assert maxdiff(out, io["inf.prefix_lm_output"]) <= bound(t["inf.prefix_lm_output"])


def test_ar_text_frontend_matches_official():
    """Whisper BPE ids (exact) and espeak-ng G2P + the official IPA shortening (exact strings)."""
    import importlib.util

    if importlib.util.find_spec("whisper") is None or importlib.util.find_spec("tiktoken") is None:
        pytest.skip("openai-whisper / tiktoken not installed (the [tts] extra)")
    from flexitrain.text import TextFrontend

    cases = json.loads((DATA / "ar_tts" / "cases.json").read_text())["text_frontend"]
    raw = TextFrontend(g2p=False)
    for text, case in cases.items():
        assert raw(text) == case["text2idx(g2p_prob=0)"], text
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed: G2P part not checked")
    front = TextFrontend(g2p=True)
    for text, case in cases.items():
        assert front.phonemizer.phonemize(text, "en") == case["g2p_phonemizer_en"], text
        assert front(text, "en") == case["text2idx(g2p_prob=1)"], text


# ----------------------------------------------------------------------------------------------------------------
# Voicebox NAR
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def voicebox():
    from flexitrain.models.tts.voicebox import VoiceboxConfig, VoiceboxNAR

    spec, io, state = component("voicebox")
    c, w = spec["config"], spec["wrapper_kwargs"]
    assert c["use_cond_code"] and c["cond_dim"] == c["hidden_size"] and c["time_scheduler"] == "cos"
    cfg = VoiceboxConfig(mel_dim=c["mel_dim"], hidden_size=c["hidden_size"], num_layers=c["num_layers"],
                         num_heads=c["num_heads"], cond_codebook_size=c["cond_codebook_size"],
                         cond_scale_factor=c["cond_scale_factor"], repa_layer_idx=c["repa_layer_idx"],
                         ssl_feature_dim=w["ssl_feature_dim"], repa_projection_dim=w["repa_projection_dim"])
    model = VoiceboxNAR.from_config(cfg)
    model.load_state_dict(state, strict=True)
    return spec, io, model.eval()


def test_voicebox_estimator_matches_official(voicebox):
    """Embedding lookup + nearest x4 upsampling: exact. Velocity and the REPA hidden state (padded query rows
    included) within 32 x their float64 deviation (~6e-6 on |v| <= 1)."""
    spec, io, model = voicebox
    vb, t = model.voicebox_model, spec["tensors"]
    assert torch.equal(vb.embed_codes(io["vf.cond_codes"]), io["vf.cond"])
    with torch.no_grad():
        v, hidden = vb(io["vf.x_t"], io["vf.t"], io["vf.cond"], io["vf.x_mask"], return_hidden=True)
    assert maxdiff(v, io["vf.v"]) <= bound(t["vf.v"])
    assert maxdiff(hidden, io["vf.repa_hidden"]) <= bound(t["vf.repa_hidden"])


@pytest.mark.parametrize("batch_guidance", [True, False])
def test_voicebox_sampler_matches_official(voicebox, batch_guidance):
    """4 Euler steps with rescaled CFG from the official initial noise: within 32 x the float64 deviation of the
    official sampler output (~1.4e-5 on |x| <= 4); the one-utterance API builds the same condition."""
    from flexitrain.models.tts.flow_sampling import sample_mel

    spec, io, model = voicebox
    vb, info = model.voicebox_model, spec["tensors"]["rd.out"]
    assert torch.equal(vb.embed_codes(io["rd.cond_codes"]), io["rd.cond"])
    out = sample_mel(vb, io["rd.cond"], io["rd.prompt_mel"], n_timesteps=4, cfg=2.0, rescale_cfg=0.75,
                     noise=io["rd.z"], batch_guidance=batch_guidance)
    assert maxdiff(out, io["rd.out"]) <= bound(info)
    out2 = model.synthesize(io["rd.gen_tokens"][0], io["rd.gen_durations"][0], io["rd.prompt_codes"][0],
                            io["rd.prompt_mel"][0], n_timesteps=4, noise=io["rd.z"])
    assert maxdiff(out2, io["rd.out"][0]) <= bound(info)


@pytest.mark.parametrize("case", ["train_a", "train_b"], ids=["prompt", "cfg_drop"])
def test_voicebox_training_objective_matches_official(voicebox, case):
    """Same RNG draws in the same order as the official code. prompt_len and the (zeroed) condition are exact. The
    bits of torch.rand are the same everywhere, but the normal draw z = sqrt(-2 ln u1) cos(2 pi u2) goes through
    vectorised (SLEEF) or scalar log/cos depending on the CPU kernel torch picks (e.g. ATEN_CPU_CAPABILITY=default
    differs from AVX-512 by 1.8e-6): rounding of the angle 2 pi u2 (ulp(2 pi)/2 = 2.4e-7) times r <= max|z|, plus a
    few ulp from log/sqrt/cos: bound 16 ulp of max|z| (same for t = 1 - cos(pi/2 u)); x_t = (1-(1-s)t) z + t x
    inherits it (+ 4 ulp of its own). flow_pred / REPA hidden within 32 x their float64 deviation (the estimator is
    run on our x_t). diff_loss is a masked mean of |flow_pred - target|,
    1-Lipschitz in flow_pred: |Δ| <= bound(flow_pred) + pairwise-summation rounding 2 ceil(log2 N) eps |loss|.
    repa_loss = mean(1 - cos): relative error of the features (<= bound/absmax of the hidden state) moves a cosine
    by at most twice that; bound 2 x that relative bound (+ the same summation term)."""
    from flexitrain.tasks.voicebox import flow_matching_loss

    spec, io, model = voicebox
    t = spec["tensors"]
    torch.manual_seed(int(io[f"{case}.torch_seed"]))
    loss, logs = flow_matching_loss(model, io["train.mel"], io[f"{case}.x_mask"], io["train.semantic_codes"][:, 0],
                                    io["train.semantic_repr_ret"])
    assert logs["prompt_len"].tolist() == io[f"{case}.prompt_len"].long().tolist()
    assert torch.equal(logs["cond"], io[f"{case}.cond_in"])
    draw = {k: 16 * EPS * t[f"{case}.{k}"]["absmax"] for k in ("t", "z")}
    assert maxdiff(logs["t"], io[f"{case}.t"]) <= draw["t"]
    assert maxdiff(logs["z"], io[f"{case}.z"]) <= draw["z"]
    assert maxdiff(logs["x_t"], io[f"{case}.x_t"]) <= draw["z"] + 4 * EPS * t[f"{case}.x_t"]["absmax"]
    assert maxdiff(logs["flow_pred"], io[f"{case}.flow_pred"]) <= bound(t[f"{case}.flow_pred"])
    assert maxdiff(logs["hidden"], io[f"{case}.repa_hidden"]) <= bound(t[f"{case}.repa_hidden"])
    n = io["train.mel"].numel()
    summation = 2 * math.ceil(math.log2(n)) * EPS
    tol_diff = bound(t[f"{case}.flow_pred"]) + summation * float(io[f"{case}.diff_loss"])
    h = t[f"{case}.repa_hidden"]
    tol_repa = 2 * bound(h) / h["absmax"] + summation * float(io[f"{case}.repa_loss"])
    assert maxdiff(logs["diff_loss"].detach(), io[f"{case}.diff_loss"]) <= tol_diff
    assert maxdiff(logs["repa_loss"].detach(), io[f"{case}.repa_loss"]) <= tol_repa
    assert maxdiff(loss.detach(), io[f"{case}.loss"]) <= tol_diff + tol_repa


def test_voicebox_training_mel_matches_official(voicebox):
    """The NAR's training mel (16 kHz -> 24 kHz -> normalised 50 Hz mel) in the frame-normalised amplitude
    domain, bound 32 x the official chain's float64 deviation of the same measure (mel24k)."""
    from flexitrain.audio.mel24k import mel24k

    _, io, _ = voicebox
    info = json.loads((DATA / "mel24k" / "cases.json").read_text())["tensors"]["mel_24k_from_16k"]
    mel, frames = mel24k(io["train.audio"], 16000, lengths=io["train.audio_lens"])
    ref = io["train.mel"]  # [B, T, 128]
    assert amp_error(denorm(mel.transpose(1, 2)), denorm(ref), 1, MEL_FLOOR) <= bound(info, "amp_dev")
    # true lengths (the official mask divides 16 kHz lengths by 24000: 2/3 of each clip; flexitrain fixes that)
    assert frames.tolist() == (io["train.audio_lens"] * 50 // 16000).tolist()


# ----------------------------------------------------------------------------------------------------------------
# Vocos
# ----------------------------------------------------------------------------------------------------------------
def test_vocos_matches_official():
    """Backbone output and waveform within 32 x their float64 deviation (~3e-5 on |h| <= 3, ~1.2e-6 on
    |wav| <= 0.09: the ISTFT divides by the window envelope, well conditioned with 4x overlap)."""
    from flexitrain.models.vocos import Vocos

    spec, io, state = component("vocos")
    cfg = {k: v for k, v in spec["config"].items() if k != "padding"}
    assert spec["config"]["padding"] == "same"
    model = Vocos(**cfg)
    model.load_state_dict(state, strict=True)
    model.eval()
    t = spec["tensors"]
    with torch.no_grad():
        assert maxdiff(model.backbone(io["mel"]), io["backbone_out"]) <= bound(t["backbone_out"])
        wav = model(io["mel"])
    assert wav.shape == (1, 1, io["mel"].shape[-1] * 480)
    assert maxdiff(wav[:, 0], io["wav"]) <= bound(t["wav"])


# ----------------------------------------------------------------------------------------------------------------
# 24 kHz mel and resampling
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mel():
    spec, io, _ = component("mel24k", state=None)
    return spec, io


def test_mel_filterbank_and_window_match_official(mel):
    """librosa's float64 Slaney filterbank rounded to float32 (official) vs ours: <= 1 ulp of each value apart;
    bound 4 ulp of the largest weight. Zeros are exact zeros in both. The periodic Hann window: 4 ulp of 1."""
    from flexitrain.audio.mel24k import Mel24k

    spec, io = mel
    m = Mel24k()
    dense = torch.zeros_like(m.mel_basis)
    idx = io["mel_basis_index"].long()
    dense[idx[0], idx[1]] = io["mel_basis_value"]
    assert maxdiff(m.mel_basis, dense) <= 4 * EPS * spec["tensors"]["mel_basis_value"]["absmax"]
    assert int((m.mel_basis != 0).sum()) == idx.shape[1]
    assert maxdiff(m.hann_window, io["hann_window"]) <= 4 * EPS


def test_logmel_and_normalised_mel_match_official(mel):
    """Compared in the frame-normalised amplitude domain (see the module docstring): about a third of the bins
    are at the 1e-5 clamp (silence, and no content above 11 kHz in 22.05 kHz speech), where the log-domain
    difference between float32 paths reaches 1e-3 (the official float64 rerun: 2.6e-3) while the amplitude
    error stays ~1e-6; bound 32 x the official float64 deviation of that measure."""
    from flexitrain.audio.mel24k import Mel24k

    spec, io = mel
    t = spec["tensors"]
    m = Mel24k()
    logmel = m.log_mel(io["wav_24k_from_in"])
    assert logmel.shape == io["logmel_24k_from_in"].shape == (1, 128, io["wav_24k_from_in"].shape[-1] // 480)
    assert amp_error(frames_last(logmel), frames_last(io["logmel_24k_from_in"]), 1, MEL_FLOOR) <= bound(
        t["logmel_24k_from_in"], "amp_dev")
    for src in ("in", "16k"):
        ours, ref = m(io[f"wav_24k_from_{src}"]), io[f"mel_24k_from_{src}"]
        assert amp_error(frames_last(denorm(ours)), frames_last(denorm(ref)), 1, MEL_FLOOR) <= bound(
            t[f"mel_24k_from_{src}"], "amp_dev"), src


@pytest.mark.parametrize("key,src,orig,new", [("wav_16k", "wav_in", 22050, 16000),
                                              ("wav_24k_from_in", "wav_in", 22050, 24000),
                                              ("wav_24k_from_16k", "wav_16k", 16000, 24000)])
def test_resample_values_match_official(mel, key, src, orig, new):
    """The torchaudio sinc_interp_hann kernel (width 6, rolloff 0.99): samples within 32 x the official float32
    vs float64 deviation (~1.7e-4 on |x| <= 0.53; each output is a ~460-tap dot product whose float32 kernel and
    sums round at ~5e-6). Compared over the common length: see the length test below."""
    from flexitrain.audio.resample import resample

    spec, io = mel
    x = io[src].reshape(1, -1)
    ours = resample(x, orig, new, backend="torch").reshape(-1)
    ref = io[key].reshape(-1)
    n = min(ours.numel(), ref.numel())
    assert abs(ours.numel() - ref.numel()) <= 1
    assert maxdiff(ours[:n], ref[:n]) <= bound(spec["tensors"][key])


# torchaudio's resample (the official code's) returns ceil(T*new/orig) samples, e.g. 16298 at 22050->16000: 11827.
def test_resample_length_matches_official(mel):
    from flexitrain.audio.resample import resample

    _, io = mel
    for key, src, orig, new in [("wav_16k", "wav_in", 22050, 16000), ("wav_24k_from_in", "wav_in", 22050, 24000),
                                ("wav_24k_from_16k", "wav_16k", 16000, 24000)]:
        assert resample(io[src].reshape(1, -1), orig, new, backend="torch").shape[-1] == io[key].shape[-1], key


def test_mel24k_from_16k_matches_official(mel):
    """mel24k() on 16 kHz audio (our resampler + mel) against the official chain (torchaudio resample + mel):
    amplitude domain, bound 32 x the official float64 deviation of the whole chain."""
    from flexitrain.audio.mel24k import mel24k

    spec, io = mel
    ours, frames = mel24k(io["wav_16k"][None], 16000, lengths=torch.tensor([io["wav_16k"].shape[0]]))
    ref = io["mel_24k_from_16k"]
    assert ours.shape == ref.shape and int(frames) == ref.shape[-1]
    assert amp_error(frames_last(denorm(ours)), frames_last(denorm(ref)), 1, MEL_FLOOR) <= bound(
        spec["tensors"]["mel_24k_from_16k"], "amp_dev")


# ----------------------------------------------------------------------------------------------------------------
# the log-domain bounds still catch small real bugs
# ----------------------------------------------------------------------------------------------------------------
def test_fbank_bound_rejects_small_errors(sensevoice):
    """Preemphasis 0.96 instead of 0.97, the povey window instead of hamming, or a frame shifted by one sample
    each move the fbank by >= 100x its bound."""
    from flexitrain.audio.kaldi_fbank import kaldi_fbank

    spec, io, _ = sensevoice
    wav, ref = io["wav_0"], io["fbank_0"]
    tol = bound(spec["tensors"]["fbank_0"], "amp_dev")
    kw = dict(scale=32768.0, window_type="hamming", preemphasis=0.97)
    good, _ = kaldi_fbank(wav, **kw)
    assert amp_error(good, ref, 2, FBANK_FLOOR) <= tol
    for bad_kw, bad_wav in [({"preemphasis": 0.96}, wav), ({"window_type": "povey"}, wav),
                            ({}, torch.nn.functional.pad(wav, (1, 0))[:, :-1])]:
        bad, _ = kaldi_fbank(bad_wav, **{**kw, **bad_kw})
        assert amp_error(bad, ref, 2, FBANK_FLOOR) >= 100 * tol, bad_kw


def test_mel_bound_rejects_small_errors(mel):
    """A symmetric instead of periodic Hann window, or mel magnitudes scaled by 1.001, exceed the log-mel bound
    by >= 10x."""
    from flexitrain.audio.mel24k import Mel24k

    spec, io = mel
    tol = bound(spec["tensors"]["logmel_24k_from_in"], "amp_dev")
    ref = frames_last(io["logmel_24k_from_in"])
    m = Mel24k()
    m.hann_window.copy_(torch.hann_window(1920, periodic=False))
    assert amp_error(frames_last(m.log_mel(io["wav_24k_from_in"])), ref, 1, MEL_FLOOR) >= 10 * tol
    m = Mel24k()
    m.mel_basis.mul_(1.001)
    assert amp_error(frames_last(m.log_mel(io["wav_24k_from_in"])), ref, 1, MEL_FLOOR) >= 10 * tol


def test_network_bound_rejects_a_small_weight_error():
    """The float bounds (32 x the float64 deviation) are tight enough to see a 0.1% error in one layer: the Vocos
    backbone's first LayerNorm scale x 1.001 moves both outputs past their bounds (~5x, measured at recording)."""
    from flexitrain.models.vocos import Vocos

    spec, io, state = component("vocos")
    model = Vocos(**{k: v for k, v in spec["config"].items() if k != "padding"})
    model.load_state_dict({**state, "backbone.norm.weight": state["backbone.norm.weight"] * 1.001}, strict=True)
    model.eval()
    t = spec["tensors"]
    with torch.no_grad():
        assert maxdiff(model.backbone(io["mel"]), io["backbone_out"]) > bound(t["backbone_out"])
        assert maxdiff(model(io["mel"])[:, 0], io["wav"]) > bound(t["wav"])
