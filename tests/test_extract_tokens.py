"""tools/extract_tokens.py on a tiny random FlexiCodec (exported folder + seeded random teacher): `--acoustic` adds
the RVQ codes of every token (equal to FlexiCodec.encode's) and leaves every other output byte-identical; shards
read and decoded in worker processes (--workers 2) give byte-identical output to --workers 0, in input order, with
a corrupt audio member and an unreadable shard reported and skipped; the summary line; restart; an error in the
main process stops the workers at once."""
from __future__ import annotations

import io
import json
import multiprocessing
import re
import sys
import tarfile
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import REPO_ROOT
from helpers_shards import write_corpus
from helpers_shards import write_shard as write_samples

sys.path.insert(0, str(REPO_ROOT / "tools"))
pytestmark = pytest.mark.usefixtures("one_thread")


def write_shard(path, clips):
    with tarfile.open(path, "w") as tar:
        for key, x in clips.items():
            for ext, data in (("flac", _flac(x)), ("json", json.dumps({"text": key}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _flac(x):
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="FLAC")
    return buf.getvalue()


def members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from hydra.utils import instantiate

    from flexitrain.utils.config import compose

    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    instantiate(compose(["model=codec_tiny"], return_hydra_config=False).model).save_pretrained(root / "model")
    g = np.random.default_rng(0)
    clips = {}
    for i, sec in enumerate((1.1, 2.0, 1.5)):
        t = np.arange(int(16000 * sec)) / 16000
        clips[f"utt{i}"] = (0.3 * np.sin(2 * np.pi * (120 + 300 * g.random()) * t * (1 + t))).astype(np.float32)
    (root / "shards").mkdir()
    write_shard(root / "shards" / "shard-000000.tar", clips)
    return root, clips


def test_acoustic_codes_added_and_other_outputs_unchanged(model_dir, tmp_path, capsys):
    import extract_tokens

    root, clips = model_dir
    common = ["--shards", str(root / "shards"), "--ckpt", str(root / "model"), "--teacher-random-init",
              "--thresholds", "0.86", "1.0", "--device", "cpu"]
    assert extract_tokens.main([*common, "--out", str(tmp_path / "plain")])["items"] == 3
    assert extract_tokens.main([*common, "--out", str(tmp_path / "ac"), "--acoustic", "--num-quantizers", "3"])[
        "items"] == 3
    plain = members(tmp_path / "plain" / "shard-000000.tar")
    ac = members(tmp_path / "ac" / "shard-000000.tar")
    assert plain.keys() == ac.keys()

    from flexitrain.evaluation.loading import load_codec

    codec, teacher = load_codec(root / "model", {"random_init": True, "num_blocks": 2})
    for key, x in clips.items():
        assert plain[f"{key}.flac"] == ac[f"{key}.flac"]
        a, b = json.loads(plain[f"{key}.tokens.json"]), json.loads(ac[f"{key}.tokens.json"])
        assert b.pop("num_quantizers") == 3 and "num_quantizers" not in a
        wav = torch.from_numpy(sf.read(io.BytesIO(plain[f"{key}.flac"]), dtype="float32")[0])[None]
        for thr in ("t0.86", "t1.00"):
            rvq = b[thr].pop("acoustic")
            assert "acoustic" not in a[thr] and b[thr] == a[thr]  # codes and durations as without --acoustic
            sem, sem_len = teacher(wav, torch.tensor([wav.shape[-1]]))
            ref = codec.encode(wav, threshold=float(thr[1:]), num_quantizers=3, semantic_features=sem,
                               semantic_lengths=sem_len)
            n = int(ref.num_tokens)
            assert rvq == ref.acoustic_codes[0, :, :n].tolist() and len(rvq) == 2 and len(rvq[0]) == len(a[thr]["codes"])
        assert a == b
    with pytest.raises(SystemExit, match="--num-quantizers 1 must be in"):
        extract_tokens.main([*common, "--out", str(tmp_path / "bad"), "--acoustic", "--num-quantizers", "1"])


def test_padded_batch_lengths_and_bf16(model_dir, tmp_path, capsys):
    """--pad-seconds rounds each batch's length up (shapes that repeat, for cudnn.benchmark on a GPU): the padding
    is masked, so the tokens are those of the unpadded run (here exactly; in general up to float rounding of the
    teacher features, as for any change of batch composition); the prepared batches really are padded. --dtype
    bf16 runs under autocast and still writes a token file per item; --compile (aot_eager: the traced graphs without
    generated kernels) gives the same tokens; the settings line names what ran."""
    import extract_tokens

    root, clips = model_dir
    common = ["--shards", str(root / "shards"), "--ckpt", str(root / "model"), "--teacher-random-init",
              "--thresholds", "0.86", "1.0", "--device", "cpu", "--workers", "0"]
    extract_tokens.main([*common, "--out", str(tmp_path / "plain")])
    extract_tokens.main([*common, "--out", str(tmp_path / "pad"), "--pad-seconds", "0.75"])
    assert "lengths padded to multiples of 0.75 s" in capsys.readouterr().out
    assert members(tmp_path / "plain" / "shard-000000.tar") == members(tmp_path / "pad" / "shard-000000.tar")
    samples = extract_tokens.read_shard(root / "shards" / "shard-000000.tar")
    plain, padded = extract_tokens.prepare_shard(samples), extract_tokens.prepare_shard(samples, pad_multiple=12000)
    assert all(b[3] % 12000 == 0 and b[3] >= max(b[4]) for b in padded["batches"])
    # the same items together, with the same lengths; only T (and so the offsets) grow
    assert [(b[0], b[2], b[4]) for b in padded["batches"]] == [(b[0], b[2], b[4]) for b in plain["batches"]]
    assert max(b[3] for b in padded["batches"]) > max(b[3] for b in plain["batches"])
    extract_tokens.main([*common, "--out", str(tmp_path / "compiled"), "--compile", "aot_eager"])
    assert "compile dac.encoder+dac.decoder" in capsys.readouterr().out  # traced graphs: the same arithmetic
    assert members(tmp_path / "plain" / "shard-000000.tar") == members(tmp_path / "compiled" / "shard-000000.tar")
    extract_tokens.main([*common, "--out", str(tmp_path / "bf16"), "--dtype", "bf16"])
    assert "dtype bf16" in capsys.readouterr().out
    bf = members(tmp_path / "bf16" / "shard-000000.tar")
    assert all(len(json.loads(bf[f"{k}.tokens.json"])["t0.86"]["codes"]) > 0 for k in clips)


def names(path):
    with tarfile.open(path) as tar:
        return [m.name for m in tar]


@pytest.fixture(scope="module")
def corpus(model_dir):
    """3 shards x 3 utterances (index.json), one corrupt flac member in shard 1, plus an unreadable shard."""
    root = model_dir[0] / "corpus"
    keys = write_corpus(root, n_shards=3, per_shard=3, seconds=(0.4, 1.2))
    shard1 = root / "shard-000001.tar"
    with tarfile.open(shard1) as tar:
        samples = {}
        for m in tar:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    bad_key = keys[4]
    samples[bad_key]["flac"] = b"fLaC" + bytes(range(256)) * 4  # not decodable
    write_samples(shard1, list(samples.items()))
    (root / "shard-000003.tar").write_bytes(b"this is not a tar file" * 100)
    return root, keys, bad_key


def run(model_dir, corpus, out, *extra):
    import extract_tokens

    return extract_tokens.main(["--shards", str(corpus[0]), "--ckpt", str(model_dir[0] / "model"),
                                "--teacher-random-init", "--thresholds", "0.86", "0.91", "--device", "cpu",
                                "--out", str(out), *extra])


def test_workers_output_identical_bad_input_skipped_summary_restart(model_dir, corpus, tmp_path, capsys):
    root, keys, bad_key = corpus
    shards = ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    outs = {}
    for w in (0, 2):
        stats = run(model_dir, corpus, tmp_path / f"w{w}", "--workers", str(w))
        assert {k: stats[k] for k in ("shards", "skipped_existing", "items", "skipped_items", "workers")} == {
            "shards": 3, "skipped_existing": 0, "items": 8, "skipped_items": 1, "workers": w}
        assert stats["skipped"] == {"corrupt_audio": 1}
        assert stats["bad_shards"] == [str(root / "shard-000003.tar")]
        printed = capsys.readouterr().out
        line = [x for x in printed.splitlines() if x.startswith("summary:")]
        assert len(line) == 1 and json.loads(printed.splitlines()[-1]) == stats
        m = re.search(r"([\d.]+) h of audio in ([\d.]+)s = ([\d.]+) hours of audio per hour", line[0])
        hours, wall, rate = map(float, m.groups())
        index = json.loads((root / "index.json").read_text())
        good = index["duration"] - json.loads(members(root / "shard-000001.tar")[f"{bad_key}.json"])["duration"]
        assert stats["audio_seconds"] == pytest.approx(good, abs=0.02) and hours == pytest.approx(good / 3600, abs=1e-4)
        assert wall == pytest.approx(stats["seconds"], abs=0.06) and rate == pytest.approx(stats["hours_per_hour"], abs=0.06)
        # `seconds` is stored rounded to 0.01 s: on a fast run (~0.25 s) that alone moves the ratio by ~2 %.
        assert stats["seconds"] > 0 and stats["hours_per_hour"] == pytest.approx(
            stats["audio_seconds"] / stats["seconds"], rel=0.02 + 0.006 / stats["seconds"], abs=0.02)
        for part in ("read/decode wait", "teacher", "codec", "other"):
            assert re.search(rf"{part} [\d.]+s \(\d+%\)", line[0]), part
        assert "1 unreadable" in line[0] and "1 skipped (corrupt_audio 1)" in line[0]
        t = stats["time"]
        assert t["teacher"] > 0 and t["codec"] > 0 and t["wait"] + t["teacher"] + t["codec"] <= stats["seconds"] + 0.05
        assert (t["decode_in_workers"] > 0) == (w > 0)
        assert sorted(p.name for p in (tmp_path / f"w{w}").iterdir()) == shards  # no .tmp; no index.json (bad shard)
        outs[w] = {name: (tmp_path / f"w{w}" / name).read_bytes() for name in shards}
    assert outs[0] == outs[2]  # byte-identical whatever the worker count

    # every original member kept in order, tokens.json after each decodable sample's members
    for name in shards:
        got = names(tmp_path / "w0" / name)
        assert [n for n in got if not n.endswith(".tokens.json")] == names(root / name)
        for i, n in enumerate(got):
            if n.endswith(".tokens.json"):  # follows the last member of its sample
                assert got[i - 1].split(".", 1)[0] == n.split(".", 1)[0] and (
                    i + 1 == len(got) or got[i + 1].split(".", 1)[0] != n.split(".", 1)[0])
    out1 = members(tmp_path / "w0" / "shard-000001.tar")
    assert f"{bad_key}.flac" in out1 and f"{bad_key}.tokens.json" not in out1

    # tokens = the codec on each utterance alone (batching and the once-per-batch teacher change nothing)
    from flexitrain.evaluation.loading import load_codec
    from flexitrain.tasks.ar_tts_data import codec_targets

    codec, teacher = load_codec(model_dir[0] / "model", {"random_init": True, "num_blocks": 2})
    got = members(tmp_path / "w0" / "shard-000002.tar")
    for key in keys[6:]:
        tok = json.loads(got[f"{key}.tokens.json"])
        assert list(tok) == ["codec", "sample_rate", "t0.86", "t0.91"] and tok["sample_rate"] == 16000
        wav = torch.from_numpy(sf.read(io.BytesIO(got[f"{key}.flac"]), dtype="float32")[0])[None]
        for thr in (0.86, 0.91):
            codes, durs, num = codec_targets(codec, teacher, wav, torch.tensor([wav.shape[-1]]), thr)
            assert tok[f"t{thr:.2f}"] == {"codes": codes[0].tolist(), "durations": durs[0].tolist()}

    # restart: complete outputs are skipped, a stale temp file is overwritten; the unreadable shard is retried
    (tmp_path / "w2" / "shard-000001.tar").unlink()
    (tmp_path / "w2" / "shard-000001.tar.tmp").write_bytes(b"partial")
    stats = run(model_dir, corpus, tmp_path / "w2", "--workers", "2")
    assert (stats["shards"], stats["skipped_existing"], stats["items"], len(stats["bad_shards"])) == (1, 2, 2, 1)
    assert {n: (tmp_path / "w2" / n).read_bytes() for n in shards} == outs[0]
    assert "summary: 1 shards (2 already done, 1 unreadable), 2 items, 1 skipped (corrupt_audio 1);" in capsys.readouterr().out
    assert not (tmp_path / "w2" / "shard-000001.tar.tmp").exists()

    # once every shard has an output, index.json is copied
    (root / "shard-000003.tar").rename(tmp_path / "bad.tar")
    try:
        stats = run(model_dir, corpus, tmp_path / "w2", "--workers", "2")
    finally:
        (tmp_path / "bad.tar").rename(root / "shard-000003.tar")
    assert (stats["shards"], stats["skipped_existing"], stats["audio_seconds"]) == (0, 3, 0)
    assert (tmp_path / "w2" / "index.json").read_bytes() == (root / "index.json").read_bytes()
    assert "0 shards (3 already done" in capsys.readouterr().out


class FailingCodec:
    def encode(self, *args, **kwargs):
        raise RuntimeError("codec failed")


def test_main_process_error_stops_workers(corpus, tmp_path):
    import extract_tokens

    root = corpus[0]
    shards = sorted(root.glob("shard-00000[0-2].tar"))
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="codec failed"):
        extract_tokens.extract_dir(shards, tmp_path / "out", FailingCodec(), None, [0.91], "x", workers=2)
    assert time.perf_counter() - start < 20
    assert not multiprocessing.active_children()  # no worker left running (they ignore SIGTERM)
    assert not list((tmp_path / "out").iterdir())  # nothing written, no temp file
