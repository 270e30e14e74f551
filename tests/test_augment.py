"""Training augmentation (data.augment): gain range, SNR of the added noise, band-limit cutoff, off by default,
input-only keeps the target clean, per-transform counts, determinism/resume, and the codec task's clean target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from flexitrain.data import AudioDataModule
from flexitrain.data.augment import parse_augment, with_noise_urls
from flexitrain.data.decode import DecodeConfig
from flexitrain.data.pipeline import AudioLoader, LoaderConfig, TrainAudioDataset, expand_shards
from flexitrain.data.stats import DataStatsLogger
from helpers_shards import audio_bytes, good_sample, write_shard

SR = 16000
REPO = Path(__file__).resolve().parents[1]
NOISE_HZ = 5000.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("aug")
    # Speech stand-in: a 100..1000 Hz tone plus white noise (energy at every frequency), 1.0..1.6 s: every 1 s crop
    # is full length, so with pad_to_bucket=False a batch has no padding unless a test asks for shorter crops.
    rng = np.random.default_rng(0)
    for s in range(2):
        write_shard(root / "speech" / f"shard-{s:06d}.tar",
                    [good_sample(f"s{s}-{i:03d}", float(rng.uniform(1.0, 1.6)), seed=100 * s + i) for i in range(24)])
    # Noise set: 5 kHz tones of random phase and level, 0.7 s each (shorter than a crop: the bank joins them).
    t = np.arange(int(0.7 * SR)) / SR
    tones = [(rng.uniform(0.05, 0.5) * np.sin(2 * np.pi * NOISE_HZ * t + rng.uniform(0, 6))).astype(np.float32)
             for _ in range(6)]
    clips = [(f"n{i}", {"wav": audio_bytes(x, fmt="WAV")}) for i, x in enumerate(tones)]
    write_shard(root / "noise" / "noise-000000.tar", clips)
    return expand_shards(str(root / "speech")), str(root / "noise")


def dataset(urls, augment=None, *, crop=1.0, workers=0, seed=0, per_worker=4, **kw):
    cfg = with_noise_urls(parse_augment(augment, SR), expand_shards)
    return TrainAudioDataset(urls, DecodeConfig(crop_samples=int(crop * SR)),
                             LoaderConfig(batch_seconds=8.0, max_batch_size=8, pad_to_bucket=False),
                             num_workers=workers, batches_per_worker=per_worker, seed=seed, shuffle_buffer=16,
                             augment=cfg, **kw)


def batches(ds, workers=0, **kw):
    return list(AudioLoader(ds, num_workers=workers, **kw)) if workers else list(ds)


def rows(batch):
    """(augmented, clean) float64 rows of each item, cut to its length."""
    for i, n in enumerate(batch["lengths"].tolist()):
        yield batch["audio"][i, 0, :n].double().numpy(), batch["clean"][i, 0, :n].double().numpy()


def band_energy(x, lo, hi=SR / 2):
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(x.size, 1 / SR)
    return spec[(f > lo) & (f <= hi)].sum() / spec.sum()


# ----------------------------------------------------------------------------- config
def test_off_by_default_and_bad_configs_fail_clearly(data, tmp_path):
    urls, noise = data
    for name in ("demo", "shards"):  # the shipped configs: every transform null -> no augmentation
        assert parse_augment(OmegaConf.load(REPO / "configs" / "data" / f"{name}.yaml").augment, SR) is None
    assert parse_augment({"target": "both", "gain": {"prob": 0.0}}, SR) is None
    assert AudioDataModule().augment is None
    # With every transform off the batches are bit-identical to the plain pipeline, with no "clean" key.
    plain = batches(dataset(urls), workers=2)
    off = batches(dataset(urls, {"target": "input", "gain": None, "noise": {"prob": 0, "shards": noise}}), workers=2)
    assert len(plain) == len(off) == 8
    for a, b in zip(plain, off):
        assert a.keys() == b.keys() and "clean" not in b
        assert a["keys"] == b["keys"] and torch.equal(a["audio"], b["audio"])
    bad = [
        ({"target": "output", "gain": {}}, "target must be 'input'"),
        ({"gain": {"prob": 1.5}}, r"augment.gain.prob must lie in \[0, 1\]"),
        ({"gain": {"min_db": 3, "max_db": -3}}, "min_db 3.0 > max_db -3.0"),
        ({"gain": {"max_db": "6"}}, "augment.gain.max_db must be a finite number"),
        ({"gian": {}}, r"unknown key\(s\) \['gian'\]"),
        ({"noise": {"prob": 0.5}}, "augment.noise.shards is required"),
        ({"noise": {"shards": noise, "min_snr_db": 20, "max_snr_db": 10}}, "min_snr_db 20.0 > max_snr_db 10.0"),
        ({"bandlimit": {"min_hz": 1000, "max_hz": 9000}}, r"max_hz <= 8000 \(Nyquist at 16000 Hz\)"),
        ({"bandlimit": {"cutoff": 1000}}, r"unknown key\(s\) \['cutoff'\]"),
    ]
    for raw, message in bad:
        with pytest.raises(ValueError, match=message):
            AudioDataModule(augment=raw)
    dm = AudioDataModule(train_shards=urls, epoch_samples=8, rank=0, world_size=1,
                         augment={"noise": {"shards": str(tmp_path / "nothing-*.tar")}})
    with pytest.raises(ValueError, match="augment.noise.shards: .* matches no shard files"):
        dm.setup("fit")


# ----------------------------------------------------------------------------- clean target
@pytest.mark.parametrize("workers", [0, 2])
def test_input_only_augments_the_input_and_keeps_the_target_clean(data, workers):
    urls, noise = data
    augment = {"target": "input", "gain": {"prob": 0.7, "min_db": -6, "max_db": 6},
               "noise": {"prob": 0.7, "shards": noise, "min_snr_db": 0, "max_snr_db": 20},
               "bandlimit": {"prob": 0.7, "min_hz": 1500, "max_hz": 6000}}
    plain = batches(dataset(urls, crop=1.2), workers)
    ds = dataset(urls, augment, crop=1.2)
    aug = batches(ds, workers)
    both = batches(dataset(urls, {**augment, "target": "both"}, crop=1.2), workers)
    assert len(plain) == len(aug) == len(both) == (8 if workers else 4)
    changed = 0
    for p, a, b in zip(plain, aug, both):
        # Same items and crops as without augmentation; the target ("clean") is their audio, bit for bit.
        assert p["keys"] == a["keys"] == b["keys"] and torch.equal(p["lengths"], a["lengths"])
        assert torch.equal(a["clean"], p["audio"]) and a["audio"].shape == a["clean"].shape
        assert "clean" not in b and torch.equal(b["audio"], a["audio"])  # target=both: the same draws, in place
        for i, n in enumerate(a["lengths"].tolist()):
            assert torch.all(a["audio"][i, 0, n:] == 0)  # padding stays zero
            changed += not torch.equal(a["audio"][i], a["clean"][i])
    assert changed > 0.5 * sum(len(b["keys"]) for b in aug)
    if workers:
        assert "_slot" not in aug[0]


# ----------------------------------------------------------------------------- transforms
def test_gain_stays_in_its_db_range_and_is_counted(data):
    urls, _ = data
    ds = dataset(urls, {"gain": {"prob": 0.5, "min_db": -9.0, "max_db": 3.0}}, per_worker=8)
    db, unchanged = [], 0
    for b in batches(ds):
        for x, c in rows(b):
            if np.array_equal(x, c):
                unchanged += 1
                continue
            big = np.abs(c) > 1e-3
            ratio = x[big] / c[big]
            assert np.allclose(ratio, ratio[0], rtol=1e-5)  # one gain per item
            db.append(20 * np.log10(np.dot(x, c) / np.dot(c, c)))
    assert all(-9.0 - 1e-4 <= d <= 3.0 + 1e-4 for d in db)
    assert min(db) < -6 and max(db) > 0  # the draws cover the range
    assert unchanged > 0 and len(db) > 0
    totals = ds.stats.totals()
    assert totals["augment/gain"] == len(db) and totals["samples"] == len(db) + unchanged
    assert "augment/noise" not in totals  # only configured transforms are counted


def test_added_noise_comes_from_the_noise_set_at_an_snr_in_range(data):
    urls, noise = data
    ds = dataset(urls, {"target": "input", "noise": {"prob": 1.0, "shards": noise, "min_snr_db": 5.0,
                                                      "max_snr_db": 15.0}}, crop=0.8, per_worker=6)
    snrs = []
    for b in batches(ds):
        for x, c in rows(b):
            added = x - c
            snr = 10 * np.log10(np.dot(c, c) / np.dot(added, added))
            snrs.append(snr)
            assert 5.0 - 0.05 <= snr <= 15.0 + 0.05
            spec = np.abs(np.fft.rfft(added))
            # The noise set is 5 kHz tones (joined in the bank: a little spread around the peak).
            assert abs(np.fft.rfftfreq(added.size, 1 / SR)[np.argmax(spec)] - NOISE_HZ) < 20
    assert max(snrs) - min(snrs) > 5  # drawn over the range, not fixed
    assert ds.stats.totals()["augment/noise"] == len(snrs)


def test_bandlimit_removes_the_energy_above_the_cutoff(data):
    urls, _ = data
    fixed = dataset(urls, {"target": "input", "bandlimit": {"prob": 1.0, "min_hz": 3000, "max_hz": 3000}})
    n = 0
    for b in batches(fixed):
        for x, c in rows(b):
            assert band_energy(c, 3000) > 1e-3  # the clean audio has energy up there
            assert band_energy(x, 3000) < 1e-8
            # Below the roll-off (10% of the cutoff) the audio is unchanged.
            below = band_energy(x, 0, 2650) * np.dot(x, x) / (band_energy(c, 0, 2650) * np.dot(c, c))
            assert abs(below - 1) < 1e-3
            n += 1
    assert fixed.stats.totals()["augment/bandlimit"] == n > 0
    ranged = dataset(urls, {"target": "input", "bandlimit": {"prob": 1.0, "min_hz": 1000, "max_hz": 6000}})
    edges = []
    for b in batches(ranged):
        for x, c in rows(b):
            assert band_energy(x, 6000) < 1e-8
            spec = np.abs(np.fft.rfft(x)) ** 2
            edges.append(np.fft.rfftfreq(x.size, 1 / SR)[np.flatnonzero(spec > 1e-9 * spec.sum())[-1]])
    assert min(edges) < 2500 and max(edges) > 4500 and max(edges) <= 6000


# ----------------------------------------------------------------------------- determinism, stats
def test_augmentation_is_seeded_replays_on_resume_and_is_logged(data):
    urls, noise = data
    augment = {"target": "input", "gain": {"prob": 0.5}, "noise": {"prob": 0.5, "shards": noise},
               "bandlimit": {"prob": 0.5, "min_hz": 2000, "max_hz": 7000}}
    ds = dataset(urls, augment, workers=2, seed=3)
    first = batches(ds, 2, epoch_fn=lambda: 1)
    again = batches(dataset(urls, augment, workers=2, seed=3), 2, epoch_fn=lambda: 1)
    resumed = batches(dataset(urls, augment, workers=2, seed=3), 2, epoch_fn=lambda: 1, skip_fn=lambda: 3)
    assert all(torch.equal(a["audio"], b["audio"]) for a, b in zip(first, again))
    assert len(resumed) == len(first) - 3
    assert all(a["keys"] == b["keys"] and torch.equal(a["audio"], b["audio"]) for a, b in zip(first[3:], resumed))

    dm = AudioDataModule(train_shards=urls, train_crop_seconds=1.0, batch_seconds=8.0, epoch_samples=32,
                         num_workers=0, rank=0, world_size=1, augment=augment)
    dm.setup("fit")
    got = list(dm.train_dataloader())
    assert all("clean" in b for b in got)
    logged = {}

    class Module:
        def log(self, name, value, **kw):
            logged[name] = value

    DataStatsLogger()._log(type("T", (), {"datamodule": dm})(), Module(), "train")
    samples = logged["data/train/samples"]
    for t in ("gain", "noise", "bandlimit"):  # about half of the items each
        assert 0.2 * samples < logged[f"data/train/augment/{t}"] < 0.8 * samples


# ----------------------------------------------------------------------------- codec task
def test_codec_task_reconstructs_the_clean_audio():
    from codec_fixtures import MICRO_MODEL, MICRO_TASK
    from hydra.utils import instantiate

    from flexitrain.utils.config import compose

    torch.manual_seed(0)
    task = instantiate(compose([*MICRO_MODEL, *MICRO_TASK]).task, _recursive_=False).eval()
    n = int(0.48 * SR)
    g = torch.Generator().manual_seed(0)
    clean = 0.3 * torch.sin(2 * torch.pi * 150 * torch.arange(n) / SR).repeat(2, 1, 1)
    noisy = clean + 0.05 * torch.randn(2, 1, n, generator=g)
    lengths = torch.full((2,), n)
    with torch.no_grad():
        torch.manual_seed(1)
        t_in, _, fake_in, real_in = task.generator_losses({"audio": noisy, "clean": clean, "lengths": lengths},
                                                          0.9, False)
        torch.manual_seed(1)
        t_plain, _, fake_plain, real_plain = task.generator_losses({"audio": noisy, "lengths": lengths}, 0.9, False)
    assert torch.equal(fake_in, fake_plain)  # the codec reads the (augmented) input either way
    assert torch.equal(real_in, clean[..., : real_in.shape[-1]])
    assert torch.equal(real_plain, noisy[..., : real_plain.shape[-1]])
    assert not torch.allclose(t_in["mel"], t_plain["mel"])  # the loss compares with the clean target
    with pytest.raises(ValueError, match="batch\\['clean'\\] must have the audio's shape"):
        task.check_batch({"audio": noisy, "clean": clean[..., :-1], "lengths": lengths})
