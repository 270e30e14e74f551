"""Demo corpus: Harvard sentences x espeak-ng voices -> disjoint splits, exact text, cached."""

import io
import json
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from flexitrain.data import demo_corpus as dc

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng is not installed (apt-get install -y espeak-ng); demo corpus tests skipped")

SMALL = dc.DemoCorpusConfig(
    num_sentences=12, valid_sentences=2, test_sentences=2, train_utterances=10,
    valid_utterances=4, test_utterances=4, voices=("en-us", "en-gb", "en-gb-scotland"),
    variants=("",), speeds=(160,), pitches=(50,), num_speakers=3, samples_per_shard=4,
    min_shards=2, jobs=2)


def _read_split(split_dir: Path) -> list[tuple[str, np.ndarray, int, dict]]:
    index = json.loads((split_dir / "index.json").read_text())
    samples = []
    for shard in index["shards"]:
        with tarfile.open(split_dir / shard["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(members):
            if name.endswith(".json"):
                key = name[:-5]
                audio, sr = sf.read(io.BytesIO(members[key + ".flac"]), dtype="float32")
                samples.append((key, audio, sr, json.loads(members[name])))
    return samples


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    out = tmp_path_factory.mktemp("demo") / "small"
    cfg = replace(SMALL, out=str(out))
    manifest = dc.build_demo_corpus(cfg, log=lambda s: None)
    return cfg, manifest


def test_harvard_asset_is_complete():
    sentences = dc.load_sentences()
    assert len(sentences) == 720 and len(set(sentences)) == 720
    assert sentences[0] == "The birch canoe slid on the smooth planks."
    assert sentences[9] == "A large size in stockings is hard to sell."
    assert sentences[-1] == "When you hear the bell, come quickly."
    assert all(s[0].isupper() and s[-1] in ".?!" for s in sentences)
    assert all(set(s) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.'-?!")
               for s in sentences)


@needs_espeak
def test_splits_are_disjoint_exact_16k_and_counted(small):
    cfg, manifest = small
    out = Path(cfg.out)
    sentences = dc.load_sentences()[:12]
    seen_sentences, keys = {}, set()
    for split, n in (("train", 10), ("valid", 4), ("test", 4)):
        samples = _read_split(out / split)
        index = json.loads((out / split / "index.json").read_text())
        assert len(samples) == n == index["num_samples"] == manifest["splits"][split]["num_samples"]
        assert index["sample_rate"] == 16000 and index["skipped"] == {}
        assert index["duration"] == pytest.approx(sum(len(a) for _, a, _, _ in samples) / 16000,
                                                  abs=1e-3)
        for key, audio, sr, meta in samples:
            assert sr == 16000 and audio.ndim == 1 and meta["num_samples"] == len(audio)
            assert meta["text"] == sentences[meta["sentence_index"]]  # exact transcript
            assert meta["split"] == split and meta["id"] == key and key not in keys
            assert meta["speaker"] in manifest["speakers"]
            assert meta["speaker"] == f"{meta['voice']}-s{meta['speed']}-p{meta['pitch']}"
            assert 0.8 < len(audio) / 16000 < 6.0 and np.sqrt(np.mean(audio ** 2)) > 0.01
            keys.add(key)
        seen_sentences[split] = {m["sentence_index"] for *_, m in samples}
        assert seen_sentences[split] == set(manifest["splits"][split]["sentence_indices"])
    assert len(seen_sentences["valid"]) == 2 and len(seen_sentences["test"]) == 2
    assert len(seen_sentences["train"]) == 8
    assert not seen_sentences["train"] & seen_sentences["valid"]
    assert not seen_sentences["train"] & seen_sentences["test"]
    assert not seen_sentences["valid"] & seen_sentences["test"]
    assert sorted(manifest["speakers"]) == ["en-gb-s160-p50", "en-gb-scotland-s160-p50",
                                            "en-us-s160-p50"]
    assert manifest["splits"]["valid"]["num_shards"] == 2  # min_shards


@needs_espeak
def test_build_is_deterministic_and_cached(small, tmp_path):
    cfg, manifest = small
    again = tmp_path / "again"
    dc.build_demo_corpus(replace(cfg, out=str(again), jobs=1), log=lambda s: None)
    assert _files(Path(cfg.out)) == _files(again)  # same bytes, whatever the thread count

    stamps = {p: p.stat().st_mtime_ns for p in again.rglob("*")}
    logs = []
    assert dc.build_demo_corpus(replace(cfg, out=str(again)), log=logs.append) == manifest
    assert logs[0].startswith("demo corpus cached")
    assert stamps == {p: p.stat().st_mtime_ns for p in again.rglob("*")}

    # Other parameters, or an incomplete build (no manifest), rebuild.
    logs.clear()
    rebuilt = dc.build_demo_corpus(replace(cfg, out=str(again), seed=7), log=logs.append)
    assert logs[0].startswith("demo corpus built") and rebuilt["params_hash"] != manifest["params_hash"]
    (again / "manifest.json").unlink()
    logs.clear()
    dc.build_demo_corpus(replace(cfg, out=str(again), seed=7), log=logs.append)
    assert logs[0].startswith("demo corpus built")


@needs_espeak
def test_speakers_differ_in_speed_and_pitch():
    text = "The juice of lemons makes fine punch."
    slow = dc.synthesize(text, dc.Speaker("en-us", "", 120, 50))
    fast = dc.synthesize(text, dc.Speaker("en-us", "", 220, 50))
    assert len(fast) < 0.75 * len(slow)
    low = dc.synthesize(text, dc.Speaker("en-us", "m3", 160, 20))
    high = dc.synthesize(text, dc.Speaker("en-us", "m3", 160, 80))
    assert not np.array_equal(low[: min(len(low), len(high))], high[: min(len(low), len(high))])


@needs_espeak
def test_cli_builds_then_reports_cached(tmp_path, capsys):
    args = ["--out", str(tmp_path / "cli"), "--num-sentences", "6", "--valid-sentences", "1",
            "--test-sentences", "1", "--train-utterances", "3", "--valid-utterances", "1",
            "--test-utterances", "1", "--voices", "en-us", "--variants", ",f2", "--speeds", "150",
            "--pitches", "40,60", "--num-speakers", "4", "--jobs", "2"]
    assert dc.main(args) == 0
    assert "demo corpus built" in capsys.readouterr().out
    assert dc.main(args) == 0
    assert "cached" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert sorted(manifest["speakers"]) == ["en-us+f2-s150-p40", "en-us+f2-s150-p60",
                                            "en-us-s150-p40", "en-us-s150-p60"]


@needs_espeak
def test_unknown_variant_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown espeak-ng variants"):
        dc.build_demo_corpus(replace(SMALL, out=str(tmp_path / "x"), variants=("m3", "nope")),
                             log=lambda s: None)
    assert {"m3", "f2", "klatt"} <= dc.espeak_variants()


def test_bad_parameters_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        dc.espeak_version("no-such-espeak-binary")
    with pytest.raises(ValueError, match="must leave train sentences"):
        dc.split_sentences(10, replace(SMALL, valid_sentences=5, test_sentences=5))
    with pytest.raises(ValueError, match="empty speaker grid"):
        dc.choose_speakers(replace(SMALL, voices=()))
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="no sentences"):
        dc.load_sentences(empty)
