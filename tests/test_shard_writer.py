"""Shard writer: folder/manifest -> WebDataset shards round trip, skips with reasons, index."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from flexitrain.data import shard_writer as sw

PCM16_STEP = 1.0 / 32768


def _tone(n: int, sr: int, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    t = np.arange(n) / sr
    noise = np.random.default_rng(seed).normal(0, 0.01, n)
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def _read_shards(out: Path) -> dict[str, tuple[np.ndarray, int, dict]]:
    """key -> (audio, rate, meta), read with plain tarfile in shard order."""
    index = json.loads((out / "index.json").read_text())
    samples: dict[str, dict] = {}
    for shard in index["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    result = {}
    for key, parts in samples.items():
        audio, sr = sf.read(io.BytesIO(parts["flac"]), dtype="float32")
        result[key] = (audio, sr, json.loads(parts["json"]))
    return result


@pytest.fixture()
def libri(tmp_path: Path) -> dict:
    """LibriSpeech-style folder: 5 good files (16k, 22.05k, 44.1k stereo) + 5 bad ones."""
    root = tmp_path / "LibriSpeech"
    good = {}
    specs = [("19", "198", 0, 16000, 1, 1.0), ("19", "198", 1, 16000, 1, 0.5),
             ("19", "198", 2, 22050, 1, 1.2), ("26", "495", 0, 44100, 2, 0.7),
             ("26", "495", 1, 16000, 1, 2.0)]
    for spk, chap, i, sr, ch, dur in specs:
        d = root / spk / chap
        d.mkdir(parents=True, exist_ok=True)
        utt = f"{spk}-{chap}-{i:04d}"
        x = _tone(int(dur * sr), sr, 300 + 100 * i, seed=i)
        if ch == 2:
            x = np.stack([x, 0.5 * x], axis=1)
        sf.write(d / f"{utt}.flac" if sr == 16000 else d / f"{utt}.wav", x, sr, subtype="PCM_16")
        good[utt] = {"text": f"SENTENCE NUMBER {i} OF SPEAKER {spk}", "speaker": spk, "sr": sr,
                     "audio": x}
    d = root / "26" / "495"
    (d / "26-495-0002.flac").write_bytes(b"fLaC not really a flac file" * 10)   # unreadable
    sf.write(d / "26-495-0003.wav", np.zeros(0, np.float32), 16000)             # empty
    nan = _tone(8000, 16000)
    nan[100] = np.nan
    sf.write(d / "26-495-0004.wav", nan, 16000, subtype="FLOAT")                # NaN
    sf.write(d / "26-495-0005.flac", _tone(16000 * 5, 16000), 16000)            # too long (> 3 s)
    sf.write(d / "26-495-0006.flac", _tone(8000, 16000), 16000)                 # no transcript
    lines = {utt: g["text"] for utt, g in good.items()}
    lines.update({f"26-495-{i:04d}": "BAD FILE" for i in (2, 3, 4, 5)})
    lines["26-495-0007"] = "TRANSCRIPT WITHOUT AUDIO"
    for spk, chap in (("19", "198"), ("26", "495")):
        text = "\n".join(f"{u} {t}" for u, t in sorted(lines.items()) if u.startswith(f"{spk}-"))
        (root / spk / chap / f"{spk}-{chap}.trans.txt").write_text(text + "\n")
    return {"root": root, "good": good}


EXPECTED_SKIPS = {"unreadable": 1, "empty": 1, "nan": 1, "too_long": 1,
                  "missing_transcript": 1, "missing_audio": 1}


def test_folder_round_trip_audio_metadata_index_and_skips(libri, tmp_path):
    out = tmp_path / "shards"
    index = sw.make_shards(libri["root"], out, max_samples_per_shard=2, max_duration=3.0,
                           progress=False, log=lambda s: None)
    samples = _read_shards(out)
    assert set(samples) == set(libri["good"])
    for key, (audio, sr, meta) in samples.items():
        g = libri["good"][key]
        assert sr == 16000 and audio.ndim == 1
        assert meta["id"] == key and meta["text"] == g["text"] and meta["speaker"] == g["speaker"]
        assert meta["language"] == "en" and meta["sample_rate"] == 16000
        assert meta["num_samples"] == len(audio)
        assert meta["duration"] == pytest.approx(len(audio) / 16000, abs=1e-6)
        assert meta["source_sample_rate"] == g["sr"] and meta["chapter"] == key.split("-")[1]
        if g["sr"] == 16000:  # untouched rate: equal to the input within PCM16 quantisation
            np.testing.assert_allclose(audio, g["audio"], atol=PCM16_STEP)
        else:  # resampled: length follows the rate ratio
            assert abs(len(audio) - round(len(g["audio"]) * 16000 / g["sr"])) <= 1
    # The stereo file is mixed to mono: (x + 0.5x) / 2.
    stereo = libri["good"]["26-495-0000"]["audio"]
    assert samples["26-495-0000"][2]["source_channels"] == 2
    assert np.abs(samples["26-495-0000"][0]).max() == pytest.approx(
        np.abs(stereo.mean(axis=1)).max(), abs=0.02)

    assert index["version"] == 1 and index["sample_rate"] == 16000
    assert index["num_samples"] == 5
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(3)]
    assert [s["num_samples"] for s in index["shards"]] == [2, 2, 1]
    assert index["duration"] == pytest.approx(sum(m["duration"] for _, _, m in samples.values()),
                                              abs=1e-3)
    assert index["skipped"] == EXPECTED_SKIPS
    assert {e["reason"] for e in index["skip_examples"]} == set(EXPECTED_SKIPS)
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk["skipped"] == EXPECTED_SKIPS and on_disk["shards"] == index["shards"]
    assert sorted(p.name for p in out.iterdir()) == ["index.json"] + [s["name"] for s in index["shards"]]


def test_webdataset_reads_the_shards(libri, tmp_path):
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "shards"
    sw.make_shards(libri["root"], out, max_samples_per_shard=2, progress=False, log=lambda s: None)
    urls = sorted(str(p) for p in out.glob("shard-*.tar"))
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    # Folder scans are sorted by id; the 5 s clip is within the default 60 s cap.
    assert keys == sorted([*libri["good"], "26-495-0005"])


def test_resampling_keeps_length_and_pitch(tmp_path):
    for sr in (22050, 44100):
        x = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(int(1.3 * sr)) / sr).astype(np.float32)
        path = tmp_path / f"tone{sr}.wav"
        sf.write(path, x, sr)
        y, source = sw.load_audio(str(path), 16000)
        assert source == {"source_sample_rate": sr, "source_channels": 1}
        assert abs(len(y) - round(len(x) * 16000 / sr)) <= 1 and abs(len(y) - 20800) <= 1
        peak_hz = np.argmax(np.abs(np.fft.rfft(y))) * 16000 / len(y)
        assert peak_hz == pytest.approx(1000, abs=2)
        assert np.abs(y).max() == pytest.approx(0.5, abs=0.01)


def _write_manifests(libri, tmp_path) -> tuple[Path, Path]:
    rows = []
    for utt, g in sorted(libri["good"].items()):
        f = next(libri["root"].rglob(f"{utt}.*[cv]"))
        rows.append({"id": utt, "path": str(f.relative_to(libri["root"])), "text": g["text"],
                     "speaker": g["speaker"], "language": "en-GB", "corpus": "toy"})
    rows.append({"id": "bad", "path": "26/495/26-495-0002.flac", "text": "x", "speaker": "26",
                 "language": "en", "corpus": "toy"})
    jsonl = libri["root"] / "manifest.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    tsv = libri["root"] / "manifest.tsv"
    cols = ["id", "path", "text", "speaker", "language", "corpus"]
    tsv.write_text("\t".join(cols) + "\n" + "".join(
        "\t".join(str(r[c]) for c in cols) + "\n" for r in rows) + "only\ttwo\n")
    return jsonl, tsv


def test_manifest_jsonl_and_tsv(libri, tmp_path):
    jsonl, tsv = _write_manifests(libri, tmp_path)
    contents = []
    for manifest in (jsonl, tsv):
        out = tmp_path / manifest.suffix[1:]
        index = sw.make_shards(manifest, out, max_samples_per_shard=3, progress=False,
                               log=lambda s: None)
        assert index["num_samples"] == 5
        assert index["skipped"] == {"bad_manifest_row": 1, "unreadable": 1}
        samples = _read_shards(out)
        for key, (audio, _, meta) in samples.items():
            g = libri["good"][key]
            assert meta["text"] == g["text"] and meta["speaker"] == g["speaker"]
            assert meta["language"] == "en-GB" and meta["corpus"] == "toy"
            assert meta["num_samples"] == len(audio)
        contents.append({k: (a.tobytes(), m) for k, (a, _, m) in samples.items()})
    assert contents[0] == contents[1]

    # A .json file holding an array of rows is read like JSONL.
    array = libri["root"] / "manifest.json"
    array.write_text(json.dumps([json.loads(l) for l in jsonl.read_text().splitlines()[:2]]))
    items, skipped, _ = sw.read_manifest(array)
    assert [u.id for u in items] == sorted(libri["good"])[:2] and not skipped


def test_manifest_errors_are_clear(tmp_path):
    bad = tmp_path / "m.tsv"
    bad.write_text("file\ttext\na.wav\thello\n")
    with pytest.raises(ValueError, match="'path' column"):
        sw.read_manifest(bad)
    with pytest.raises(ValueError, match=".jsonl or .tsv"):
        (tmp_path / "m.xml").write_text("<x/>")
        sw.read_manifest(tmp_path / "m.xml")
    with pytest.raises(FileNotFoundError):
        sw.make_shards(tmp_path / "nope", tmp_path / "out")


def test_workers_give_identical_output_and_build_is_idempotent(libri, tmp_path):
    quiet = dict(max_samples_per_shard=2, progress=False, log=lambda s: None)
    one, two = tmp_path / "one", tmp_path / "two"
    sw.make_shards(libri["root"], one, workers=1, **quiet)
    sw.make_shards(libri["root"], two, workers=2, **quiet)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    for name in names:  # same bytes, index included (no timestamps)
        assert (one / name).read_bytes() == (two / name).read_bytes(), name

    # Second run with the same inputs: nothing rewritten.
    stamp = {p.name: p.stat().st_mtime_ns for p in one.iterdir()}
    messages = []
    sw.make_shards(libri["root"], one, max_samples_per_shard=2, progress=False,
                   log=messages.append)
    assert "up to date" in messages[0]
    assert stamp == {p.name: p.stat().st_mtime_ns for p in one.iterdir()}

    # A replaced input file is noticed and re-encoded.
    path = libri["root"] / "19" / "198" / "19-198-0001.flac"
    sf.write(path, _tone(4000, 16000, 1000), 16000)
    index = sw.make_shards(libri["root"], one, max_samples_per_shard=2, progress=False,
                           log=messages.append)
    assert messages[-1].startswith("wrote 6 utterances")
    assert _read_shards(one)["19-198-0001"][2]["num_samples"] == 4000

    # Changed options rebuild and remove stale shards and temp leftovers of a crashed run.
    (one / ".tmp-c000009-0000.tar").write_bytes(b"partial")
    index = sw.make_shards(libri["root"], one, max_samples_per_shard=10, progress=False,
                           log=lambda s: None)
    assert sorted(p.name for p in one.iterdir()) == ["index.json", "shard-000000.tar"]
    assert index["shards"][0]["num_samples"] == 6  # 5 good + the 5 s clip (default cap 60 s)


def test_max_shard_size_rolls_over(libri, tmp_path):
    out = tmp_path / "small"
    index = sw.make_shards(libri["root"], out, max_shard_size="40kB", max_duration=3,
                           progress=False,
                           log=lambda s: None)
    assert len(index["shards"]) >= 3 and index["num_samples"] == 5
    for shard in index["shards"]:  # a shard over the limit holds a single (large) sample
        size = (out / shard["name"]).stat().st_size
        assert size <= 40_000 + 10_240 or shard["num_samples"] == 1


def test_parse_size():
    assert sw.parse_size("500MB") == 500_000_000 and sw.parse_size("2G") == 2_000_000_000
    assert sw.parse_size("100k") == 100_000 and sw.parse_size(1234) == 1234
    assert sw.parse_size("0") is None
    with pytest.raises(ValueError, match="cannot parse size"):
        sw.parse_size("big")


def test_keys_never_contain_dots(tmp_path):
    assert sw.sanitize_key("a.b/c d") == "a_b_c_d"
    sink = sw.ShardSink(tmp_path)
    with pytest.raises(ValueError, match="must not contain"):
        sink.write("a.b", b"", {"duration": 0})


def test_cli_prints_summary_with_skip_reasons(libri, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = sw.main([str(libri["root"]), str(out), "--workers", "1", "--max-duration", "3",
                  "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "wrote 5 utterances" in text and " h)" in text
    for reason, count in EXPECTED_SKIPS.items():
        assert f"{reason}={count}" in text
    assert sw.main([str(tmp_path / "missing"), str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert os.path.exists(out / "index.json")

    # The option spellings used in the README work too.
    jsonl, _ = _write_manifests(libri, tmp_path)
    assert sw.main(["--manifest", str(jsonl), "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    assert "wrote 5 utterances" in capsys.readouterr().out
    assert sw.main(["--input", str(libri["root"]), "--out", str(tmp_path / "i"), "--workers", "1",
                    "--no-progress"]) == 0
    assert "wrote 6 utterances" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sw.main(["--input", str(libri["root"])])  # no output folder
    assert "give one input" in capsys.readouterr().err
