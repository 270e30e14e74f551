"""Metrics on known inputs: text normalisation, WER/CER, signal quality, rates, the worker pool."""

import math

import jiwer
import numpy as np
import pytest
import torch

from flexitrain.metrics import (CharErrorRate, MetricPool, QUALITY_METRICS, RateAccumulator, WordErrorRate,
                                bits_per_token, char_error_rate, compute_quality, compute_quality_batch,
                                duration_side_bits, error_counts, flexicodec_codebook_sizes, frame_rate_stats,
                                mel_distance, normalize_text, number_to_words, pesq_score, si_sdr,
                                split_token_lengths, stoi_score, summarize, summarize_records,
                                token_length_histogram, utterance_error_rates, word_error_rate)

SR = 16000


# ---------------------------------------------------------------- text normalisation and WER

@pytest.mark.parametrize("text, expected", [
    ("Hello, World!", "hello world"),
    ("I don\u2019t know\u2014really.", "i dont know really"),
    ("It costs 1,000,000 dollars & 3.5 cents", "it costs one million dollars and three point five cents"),
    ("the 21st, 2nd, 12th and 100th", "the twenty first second twelfth and one hundredth"),
    ("50% of 007", "fifty percent of zero zero seven"),
    ("well-known  snake_case\tTEXT ", "well known snake case text"),
    ("Caf\u00e9 1995", "caf\u00e9 one thousand nine hundred ninety five"),
    ("", ""),
])
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


def test_number_to_words():
    assert number_to_words(0) == "zero"
    assert number_to_words(105) == "one hundred five"
    assert number_to_words(1_000_001) == "one million one"
    assert number_to_words(40_019) == "forty thousand nineteen"
    with pytest.raises(ValueError):
        number_to_words(-1)


def test_wer_with_normalisation_known_values():
    assert word_error_rate("Hello, World!", "hello world") == 0.0
    # 1 substitution (sat -> sit) + 1 deletion (the) over 6 reference words
    assert word_error_rate("The cat sat on the mat.", "the cat sit on mat") == pytest.approx(2 / 6)
    # pooled over sentences: (2 + 1) errors / (6 + 2) words
    assert word_error_rate(["the cat sat on the mat", "good morning"], ["the cat sit on mat", "good evening"]) \
        == pytest.approx(3 / 8)
    # numbers are spelled out on both sides
    assert word_error_rate("I have 2 dogs", "i have two dogs") == 0.0
    assert char_error_rate("abc", "abd") == pytest.approx(1 / 3)


def test_wer_equals_jiwer_without_normalisation():
    refs = ["the quick brown fox", "jumps over the lazy dog", "a b c d"]
    hyps = ["the quack brown fox fox", "jumps over lazy dog", "a x c"]
    assert word_error_rate(refs, hyps, normalize=False) == pytest.approx(jiwer.wer(refs, hyps))
    assert char_error_rate(refs, hyps, normalize=False) == pytest.approx(jiwer.cer(refs, hyps))


def test_error_counts_edge_cases():
    c = error_counts(["", "a b"], ["x y", "a b"])  # empty reference: its words are insertions
    assert (c.insertions, c.hits, c.reference_length) == (2, 2, 2) and c.rate == 1.0
    assert math.isnan(word_error_rate("", ""))
    assert word_error_rate("a", "") == 1.0
    assert word_error_rate("...", "hello") == math.inf
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        word_error_rate(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unit"):
        error_counts("a", "a", unit="phone")
    u = utterance_error_rates("The cat sat.", "the cat")
    assert u == {"wer": pytest.approx(1 / 3), "cer": pytest.approx(4 / 11), "ref_words": 3.0, "word_errors": 1.0}


def test_torchmetrics_wrappers_accumulate_pooled_counts():
    wer, cer = WordErrorRate(), CharErrorRate()
    refs, hyps = ["The cat sat on the mat.", "Good morning!"], ["the cat sit on mat", "good evening"]
    for r, h in zip(refs, hyps):
        wer.update([h], [r])
        cer.update(h, r)
    assert wer.compute().item() == pytest.approx(word_error_rate(refs, hyps))
    assert cer.compute().item() == pytest.approx(char_error_rate(refs, hyps))
    wer.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(wer.compute().item())


# ---------------------------------------------------------------- signal quality

def _speechlike(seconds=3.0, seed=0):
    """Voiced-ish harmonic signal with syllable-rate amplitude modulation and pauses."""
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 20))
    envelope = np.clip(np.sin(2 * np.pi * 2.0 * t), 0, None) ** 0.5
    rng = np.random.default_rng(seed)
    return (0.2 * voiced * envelope + 0.01 * rng.standard_normal(t.size) * envelope).astype(np.float64)


@pytest.fixture(scope="module")
def clean():
    return _speechlike()


def _noisy(x, snr_db, seed=1):
    noise = np.random.default_rng(seed).standard_normal(x.size)
    noise *= np.sqrt(np.mean(x ** 2) / np.mean(noise ** 2) / 10 ** (snr_db / 10))
    return x + noise


def test_quality_identical_is_high(clean):
    q = compute_quality(clean, clean, SR)
    assert set(q) == set(QUALITY_METRICS)
    assert q["pesq_wb"] > 4.5 and q["pesq_nb"] > 4.4
    assert q["stoi"] > 0.999 and q["estoi"] > 0.999
    assert q["si_sdr"] > 60 and q["mel_distance"] == pytest.approx(0.0, abs=1e-9)


def test_quality_decreases_with_noise(clean):
    q = [compute_quality(clean, _noisy(clean, snr), SR) for snr in (30, 15, 0)]
    for better, worse in zip(q, q[1:]):
        for name in ("pesq_wb", "pesq_nb", "stoi", "estoi", "si_sdr"):
            assert better[name] > worse[name], name
        assert better["mel_distance"] < worse["mel_distance"]
    # additive white noise at a given SNR: SI-SDR is that SNR (noise nearly orthogonal to the signal)
    assert q[1]["si_sdr"] == pytest.approx(15.0, abs=0.3)


def test_quality_matches_reference_packages(clean):
    import pesq
    import pystoi
    from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio

    deg = _noisy(clean, 10)
    assert pesq_score(clean, deg, SR, "wb") == pytest.approx(pesq.pesq(SR, clean, deg, "wb"), abs=1e-6)
    assert pesq_score(clean, deg, SR, "nb") == pytest.approx(pesq.pesq(SR, clean, deg, "nb"), abs=1e-6)
    assert stoi_score(clean, deg, SR) == pytest.approx(pystoi.stoi(clean, deg, SR), abs=1e-9)
    assert stoi_score(clean, deg, SR, extended=True) == pytest.approx(pystoi.stoi(clean, deg, SR, extended=True), abs=1e-9)
    ref_sisdr = scale_invariant_signal_distortion_ratio(torch.from_numpy(deg), torch.from_numpy(clean),
                                                             zero_mean=True).item()
    assert si_sdr(clean, deg) == pytest.approx(ref_sisdr, abs=1e-4)
    assert si_sdr(clean, 0.3 * deg) == pytest.approx(si_sdr(clean, deg), abs=1e-9)  # scale invariant


def test_mel_filterbank_matches_librosa(clean):
    librosa = pytest.importorskip("librosa")
    from flexitrain.metrics.quality import _mel_filterbank

    ours = _mel_filterbank(SR, 1024, 80, 0.0, 8000.0).T
    ref = librosa.filters.mel(sr=SR, n_fft=1024, n_mels=80, fmin=0.0, fmax=8000.0, htk=True, norm=None)
    # float64 formula vs librosa's float64 formula stored as float32: ½ ulp ≤ 6e-8 for weights ≤ 1; atol 1e-6 ≈ 8 EPS.
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_log_mel_matches_torch_stft(clean):
    from flexitrain.metrics.quality import _log_mel, _mel_filterbank

    x = torch.from_numpy(clean)
    spec = torch.stft(x, 1024, 256, window=torch.hann_window(1024, dtype=torch.float64), center=True,
                      return_complex=True).abs() ** 2
    ref = torch.log10((torch.from_numpy(_mel_filterbank(SR, 1024, 80, 0.0, 8000.0)).T @ spec).clamp_min(1e-5))
    # Both float64 (eps 2.2e-16): a bin's relative error is ~eps·(frame power / bin power); above the 1e-5 clamp
    # that ratio is ≤ 8e5 for this clip, so ≲ 1e-10 in log10 for any float64 FFT. atol 1e-9; measured 1e-14.
    np.testing.assert_allclose(_log_mel(clean, SR, 1024, 256, 80, 0.0, 8000.0), ref.T.numpy(), atol=1e-9)


def test_length_mismatch_trims_to_shorter(clean):
    deg = _noisy(clean, 20)
    longer = np.concatenate([deg, np.full(700, 0.5)])  # extra tail must be ignored
    a = compute_quality(clean, longer, SR)
    b = compute_quality(clean, deg, SR)
    assert a == pytest.approx(b)
    c = compute_quality(torch.from_numpy(clean[:-300])[None], torch.from_numpy(deg)[None], SR)  # [1, T] tensors
    assert c == pytest.approx(compute_quality(clean[:-300], deg[:-300], SR))


def test_silence_and_short_clips_give_nan_and_are_counted(clean):
    q = compute_quality(np.zeros(SR), clean[:SR], SR)
    for name in ("pesq_wb", "pesq_nb", "stoi", "estoi", "si_sdr"):
        assert math.isnan(q[name]), name
    short = compute_quality(clean[:1000], clean[:1000], SR)
    assert math.isnan(short["stoi"]) and math.isnan(short["pesq_wb"])
    s = summarize([1.0, 3.0, float("nan"), float("inf")])
    assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 2.0, "n_nan": 2.0}
    table = summarize_records([q, compute_quality(clean, clean, SR)])
    assert table["pesq_wb"]["n"] == 1 and table["pesq_wb"]["n_nan"] == 1


def test_quality_bad_input_errors(clean):
    with pytest.raises(ValueError, match="needs 16 kHz"):
        pesq_score(clean, clean, 8000, "wb")
    with pytest.raises(ValueError, match="mono"):
        compute_quality(np.zeros((2, 100)), np.zeros(100), SR)
    with pytest.raises(ValueError, match="unknown quality metrics"):
        compute_quality(clean, clean, SR, ["pesq"])
    with pytest.raises(ValueError, match="NaN"):
        si_sdr(np.array([0.0, np.nan]), np.zeros(2))
    noise = np.random.default_rng(0).standard_normal(SR) * 0.1  # no bin near the 1e-5 floor
    assert mel_distance(noise, noise * 0.5, SR) == pytest.approx(2 * np.log10(2), abs=1e-9)  # power ratio 4


def test_other_sample_rates_are_resampled_for_pesq(clean):
    import soxr

    deg = _noisy(clean, 15)
    x24, d24 = soxr.resample(clean, SR, 24000), soxr.resample(deg, SR, 24000)
    assert pesq_score(x24, d24, 24000) == pytest.approx(pesq_score(clean, deg, SR), abs=0.15)


# ---------------------------------------------------------------- rates

def test_frame_rate_and_bitrate_exact():
    acc = RateAccumulator(max_tokens_per_group=8)
    acc.update([1, 1, 2], 0.32)        # 3 tokens in 0.32 s -> 9.375 Hz
    acc.update(torch.ones(10, dtype=torch.long), 0.8)  # fixed rate -> 12.5 Hz
    out = acc.compute(flexicodec_codebook_sizes(8))
    fr = out["frame_rate"]
    assert fr["pooled"] == pytest.approx(13 / 1.12)
    assert fr["mean"] == pytest.approx(10.9375) and fr["std"] == pytest.approx(1.5625)
    assert (fr["min"], fr["max"], fr["n"]) == (9.375, 12.5, 2.0)
    assert out["bits_per_token"] == 99.0  # 15 + 7 * 12
    assert out["side_bits_per_token"] == 3.0
    assert out["bitrate_bps"] == pytest.approx(13 / 1.12 * 99)
    assert out["bitrate_with_side_bps"] == pytest.approx(13 / 1.12 * 102)
    assert out["token_length_histogram"] == [12, 1, 0, 0, 0, 0, 0, 0]
    assert out["mean_token_length"] == pytest.approx(14 / 13)
    p = np.array([12, 1]) / 13
    ent = acc.compute(flexicodec_codebook_sizes(8), side_info="entropy")
    assert ent["side_bits_per_token"] == pytest.approx(float(-(p * np.log2(p)).sum()))


def test_fixed_rate_is_12_5_hz():
    acc = RateAccumulator(8)
    for n in (25, 50, 13):
        acc.update(np.ones(n, dtype=np.int64), n * 0.08)
    one = acc.compute(flexicodec_codebook_sizes(1))
    assert one["frame_rate"]["pooled"] == pytest.approx(12.5)
    assert one["frame_rate"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert one["bitrate_bps"] == pytest.approx(187.5)  # 15 bits * 12.5 Hz
    assert acc.compute(flexicodec_codebook_sizes(8))["bitrate_bps"] == pytest.approx(1237.5)
    assert acc.compute(flexicodec_codebook_sizes(8), "entropy")["side_bits_per_token"] == 0.0


def test_rate_helpers():
    assert bits_per_token([32768]) == 15.0 and bits_per_token([4096] * 3) == 36.0
    assert bits_per_token([1000]) == pytest.approx(math.log2(1000))
    assert [duration_side_bits(m) for m in (1, 2, 6, 8, 9)] == [0.0, 1.0, 3.0, 3.0, 4.0]
    assert duration_side_bits(8, "none") == 0.0
    with pytest.raises(ValueError, match="histogram"):
        duration_side_bits(8, "entropy")
    assert token_length_histogram([np.array([1, 2, 2]), np.array([6])], max_len=6).tolist() == [1, 2, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="exceeds"):
        token_length_histogram(np.array([9]), max_len=8)
    with pytest.raises(ValueError, match="positive integer"):
        token_length_histogram(np.array([1, 0]))
    stats = frame_rate_stats([5, 10], [1.0, 1.0])
    assert stats["pooled"] == 7.5 and stats["total_tokens"] == 15
    with pytest.raises(ValueError, match="positive"):
        frame_rate_stats([1], [0.0])
    with pytest.raises(ValueError, match="num_quantizers"):
        flexicodec_codebook_sizes(0)


def test_update_batch_crops_padding_by_total_frames():
    # item 0: 3 valid tokens then padded frames showing up as length-1 tokens and zeros
    tl = torch.tensor([[2, 1, 3, 1, 0], [1, 1, 1, 1, 1]])
    total = torch.tensor([3, 5])
    assert [a.tolist() for a in split_token_lengths(tl, total)] == [[2, 1, 3], [1, 1, 1, 1, 1]]
    acc = RateAccumulator(6)
    acc.update_batch(tl, total, num_samples=torch.tensor([9600, 6400]), sample_rate=16000)
    fr = acc.compute([32768])["frame_rate"]
    assert fr["pooled"] == pytest.approx(8 / 1.0) and fr["min"] == pytest.approx(5.0)
    other = RateAccumulator(6)
    other.update([1], 0.08)
    merged = acc.merge(other).compute([32768])
    assert merged["frame_rate"]["n"] == 3 and merged["token_length_histogram"][0] == 7


# ---------------------------------------------------------------- worker pool

def test_pool_matches_serial_and_keeps_order(clean):
    refs = [clean[: SR * 2]] * 4
    degs = [_noisy(refs[0], snr, seed=snr) for snr in (30, 20, 10, 0)]
    names = ("pesq_wb", "stoi", "si_sdr", "mel_distance")
    serial = compute_quality_batch(refs, degs, SR, names, num_workers=0)
    with MetricPool(2) as pool:
        par = compute_quality_batch(refs, [torch.from_numpy(d) for d in degs], SR, names, pool=pool)
    assert len(par) == 4
    for s, p in zip(serial, par):
        assert p == pytest.approx(s, rel=1e-5)
    assert [r["si_sdr"] for r in par] == sorted((r["si_sdr"] for r in par), reverse=True)
    with pytest.raises(ValueError, match="2 references but 1"):
        compute_quality_batch(refs[:2], degs[:1], SR)
