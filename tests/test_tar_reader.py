"""Reading a shard (`shard_reader.tar_members` / `iter_shard`: webdataset's reading path, Python's `tarfile`
in "r|*" mode and webdataset's grouping rules) on the tar variants real corpora contain: GNU long names,
pax headers (long paths, non-ASCII names, extended attributes, records with newlines, size records),
compressed shards, truncated members and headers, empty shards, directories and other non-regular members,
members without a key or an extension, duplicate and oversize members.  Python's `tarfile` in random-access
mode is the reference for the members of every valid archive; what the project adds is checked here too:
a cut or corrupt header counts as a broken shard (tarfile alone ends the archive there quietly), samples
before the damage are kept, empty shards are told apart from broken ones, oversize members are not read."""

from __future__ import annotations

import gzip
import io
import itertools
import lzma
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from helpers_shards import audio_bytes, good_sample, meta, tone, write_shard

import flexitrain.data.shard_reader as shard_reader
from flexitrain.data.decode import DecodeConfig
from flexitrain.data.pipeline import EvalAudioDataset, LoaderConfig, TrainAudioDataset
from flexitrain.data.shard_reader import TarFormatError, iter_shard, tar_members
from flexitrain.data.stats import DataStats

SR = 16000
LONG_DIR = "corpus/" + "/".join(f"speaker-{i:02d}-with-a-rather-long-directory-name" for i in range(4))
assert len(LONG_DIR) > 155  # no ustar prefix split possible: GNU 'L' / pax 'path' records are needed


# ----------------------------------------------------------------------------- helpers
def _members(path: Path) -> list[tuple[str, bytes]]:
    """(name, data) of the regular members, as the shard reader streams them."""
    with open(path, "rb") as f:
        return [(name, read()) for name, read in tar_members(f, str(path))]


def _is_meta(name: str) -> bool:
    return name.rpartition("/")[2].startswith("__")


def _reference(path: Path) -> list[tuple[str, bytes]]:
    """(name, data) of the regular members but webdataset's metadata members (`__*__`), read with
    Python's tarfile in random-access mode."""
    with tarfile.open(path, "r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg() and not _is_meta(m.name)]


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind=tarfile.REGTYPE, **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in attrs.items():
        setattr(info, k, v)
    if kind in (tarfile.REGTYPE, tarfile.CONTTYPE):
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def _write(path: Path, entries, fmt=tarfile.GNU_FORMAT) -> Path:
    """entries: [(name, data)] regular files, or (name, None, kind, attrs) for other members."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt) as tar:
        for e in entries:
            if len(e) == 2:
                _add(tar, e[0], e[1])
            else:
                _add(tar, e[0], b"", e[2], **e[3])
    return path


def _sample_entries(keys, seconds: float = 0.5, exts=("flac", "json")):
    out = []
    for i, key in enumerate(keys):
        _, members = good_sample(key.rpartition("/")[2] or "k", seconds, seed=i, sr=SR)
        members["json"] = meta(key, seconds, SR)
        for ext in exts:
            out.append((f"{key}.{ext}", members[ext]))
    return out


def _samples(path, stats=None) -> list[dict]:
    stats = stats if stats is not None else DataStats(0)
    out = list(iter_shard(str(path), stats))
    stats.flush()  # publish the counts for totals()
    return out


def _eval_keys(urls) -> list[str]:
    ds = EvalAudioDataset([str(u) for u in urls], DecodeConfig(), LoaderConfig(batch_seconds=4.0, max_batch_size=4))
    return [k for b in ds for k in b["keys"]]


def _train_keys(urls) -> list[str]:
    """One single-process pass of the split (not resampled) training stream, no shuffle buffer."""
    ds = TrainAudioDataset([str(u) for u in urls], DecodeConfig(crop_samples=SR), LoaderConfig(batch_seconds=4.0),
                           resampled=False, shuffle_buffer=0, batches_per_worker=None)
    return [k for b in ds for k in b["keys"]]


# ----------------------------------------------------------------------------- long names and pax headers
@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["gnu", "pax", "ustar"])
def test_long_names_match_tarfile(tmp_path, fmt):
    """Names over 100 bytes: GNU 'L' records, pax 'path' records, or the ustar prefix field (where it fits)."""
    long_dir = LONG_DIR if fmt != tarfile.USTAR_FORMAT else "corpus/" + "p" * 120  # ustar: prefix <= 155 bytes
    keys = [f"{long_dir}/utt-{i:03d}" for i in range(3)] + ["short/utt-x"]
    path = _write(tmp_path / "long.tar", _sample_entries(keys), fmt)
    ours = _members(path)
    assert ours == _reference(path)
    assert [n for n, _ in ours][0] == f"{keys[0]}.flac"
    samples = _samples(path)
    assert [s["__key__"] for s in samples] == keys
    assert all(set(s) >= {"flac", "json"} for s in samples)


def test_gnu_long_name_and_long_link_name(tmp_path):
    """A GNU 'K' (long link name) record before a symlink must not rename the next regular member."""
    entries = _sample_entries([f"{LONG_DIR}/a"]) + [
        (f"{LONG_DIR}/link.flac", None, tarfile.SYMTYPE, {"linkname": LONG_DIR + "/target-" + "t" * 100}),
    ] + _sample_entries(["b"])
    path = _write(tmp_path / "k.tar", entries, tarfile.GNU_FORMAT)
    assert _members(path) == _reference(path)
    assert [s["__key__"] for s in _samples(path)] == [f"{LONG_DIR}/a", "b"]


def test_pax_non_ascii_names_and_xattrs(tmp_path):
    """pax headers: a UTF-8 path (written as a pax record even when short), extended attributes and other
    records (SCHILY.xattr.*, comment, mtime) that must be ignored, and a pax header on a directory."""
    path = tmp_path / "pax.tar"
    keys = ["sprecher-Müller/äußerung-1", "说话人/句子-2", f"{LONG_DIR}/ü-3"]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        dir_info = tarfile.TarInfo("说话人")
        dir_info.type = tarfile.DIRTYPE
        dir_info.pax_headers = {"comment": "a directory with a pax header"}
        tar.addfile(dir_info)
        for i, (name, data) in enumerate(_sample_entries(keys)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1.5 + i  # fractional: a pax mtime record
            info.pax_headers = {"SCHILY.xattr.user.origin": "corpus-ü", "comment": f"member {i}"}
            tar.addfile(info, io.BytesIO(data))
    assert _members(path) == _reference(path)
    assert [s["__key__"] for s in _samples(path)] == keys


def test_pax_record_value_with_newline(tmp_path):
    """pax records are `<length> key=value\\n`; a value may itself contain newlines."""
    path = tmp_path / "nl.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, (name, data) in enumerate(_sample_entries([f"{LONG_DIR}/u{i}" for i in range(2)])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = {"comment": "first line\nsecond line\n\nfourth"}
            tar.addfile(info, io.BytesIO(data))
    assert _members(path) == _reference(path)


def test_pax_record_value_that_looks_like_a_record(tmp_path):
    path = tmp_path / "fake.tar"
    data = audio_bytes(tone(0.5, SR), SR)
    name = f"{LONG_DIR}/real.flac"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        # "path" first (tarfile keeps a given path record in place), then a comment whose value holds
        # a newline and text that looks like a further path record.
        info.pax_headers = {"path": name, "comment": "note\n20 path=fake.flac"}
        tar.addfile(info, io.BytesIO(data))
    assert _reference(path) == [(name, data)]
    assert _members(path) == [(name, data)]


def test_pax_size_record_overrides_the_header(tmp_path):
    path = tmp_path / "size.tar"
    entries = _sample_entries(["a", "b"])
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = {"size": str(len(data))}
            tar.addfile(info, io.BytesIO(data))
    raw = bytearray(path.read_bytes())
    with tarfile.open(path, "r:") as tar:
        first = tar.getmembers()[0]
    h = first.offset_data - 512  # the ustar header of a.flac (after its pax header)
    raw[h + 124:h + 136] = b"0" * 11 + b"\0"  # size field 0, as written for members >= 8 GiB
    raw[h + 148:h + 156] = b" " * 8
    raw[h + 148:h + 156] = b"%06o\0 " % sum(raw[h:h + 512])
    path.write_bytes(bytes(raw))
    assert _reference(path) == entries
    assert _members(path) == entries


def test_pax_global_header_is_not_a_member(tmp_path):
    path = tmp_path / "g.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global", "x": "y"}) as tar:
        for name, data in _sample_entries(["a", "b"]):
            _add(tar, name, data)
    assert _members(path) == _reference(path)
    assert [s["__key__"] for s in _samples(path)] == ["a", "b"]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_long_names_through_the_datasets(tmp_path, fmt):
    keys = [f"{LONG_DIR}/utt-{i:03d}" for i in range(5)]
    path = _write(tmp_path / "long.tar", _sample_entries(keys), fmt)
    assert sorted(_eval_keys([path])) == sorted(keys)
    assert sorted(_train_keys([path])) == sorted(keys)


# ----------------------------------------------------------------------------- truncation
def _good_shard(tmp_path, n=4) -> tuple[Path, list[str]]:
    keys = [f"spk-utt{i}" for i in range(n)]
    return write_shard(tmp_path / "good.tar", [good_sample(k, 0.5, seed=i) for i, k in enumerate(keys)]), keys


def _offsets(path: Path) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of each member, from tarfile."""
    with tarfile.open(path, "r:") as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar.getmembers()]


def _cut(path: Path, at: int, out: Path) -> Path:
    out.write_bytes(path.read_bytes()[:at])
    return out


def test_truncated_in_member_data(tmp_path):
    """Cut inside the data of the 3rd sample's flac: the reader raises TarFormatError; iter_shard keeps the
    two complete samples, drops the partial one and counts a bad shard (not an empty one)."""
    path, keys = _good_shard(tmp_path)
    name, _, data_at = _offsets(path)[4]
    assert name == f"{keys[2]}.flac"
    cut = _cut(path, data_at + 100, tmp_path / "cut.tar")
    with pytest.raises(TarFormatError, match="unexpected end"):
        _members(cut)
    stats = DataStats(0)
    assert [s["__key__"] for s in _samples(cut, stats)] == keys[:2]
    totals = stats.totals()
    assert totals["bad_shard"] == 1 and totals["empty_shard"] == 0


def test_truncated_in_a_header(tmp_path):
    """tarfile alone ends the archive quietly at a cut header (after the first member); here it is an error."""
    path, keys = _good_shard(tmp_path)
    _, header_at, _ = _offsets(path)[6]  # the 4th sample's flac header
    cut = _cut(path, header_at + 300, tmp_path / "cut.tar")
    with tarfile.open(cut, "r|*") as tar:  # the quiet end this reader must not inherit
        assert len([m for m in tar if m.isreg()]) == 6
    with pytest.raises(TarFormatError, match="truncated header"):
        _members(cut)
    stats = DataStats(0)
    # The 3rd sample's members were all read, but the reader cannot tell it was complete (the cut header may
    # have been one more of its members): it is dropped too.  (webdataset with warn_and_continue keeps it.)
    assert [s["__key__"] for s in _samples(cut, stats)] == keys[:2]
    assert stats.totals()["bad_shard"] == 1


def test_corrupt_header_mid_shard(tmp_path):
    """A header with a bad checksum after good members (a corrupt block): a broken shard, not its end."""
    path, keys = _good_shard(tmp_path)
    _, header_at, _ = _offsets(path)[4]  # the 3rd sample's flac header
    raw = bytearray(path.read_bytes())
    raw[header_at + 10] ^= 0x55
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(raw))
    with pytest.raises(TarFormatError, match="checksum"):
        _members(bad)
    stats = DataStats(0)
    # As with a cut header, the sample before the bad header may have been incomplete: it is dropped.
    assert [s["__key__"] for s in _samples(bad, stats)] == keys[:1]
    assert stats.totals()["bad_shard"] == 1 and stats.totals()["empty_shard"] == 0


def test_truncated_in_padding(tmp_path):
    """The last member's data is complete but its padding to 512 bytes is cut off."""
    path, keys = _good_shard(tmp_path)
    name, _, data_at = _offsets(path)[-1]
    size = len(dict(_reference(path))[name])
    assert size % 512
    cut = _cut(path, data_at + size + 1, tmp_path / "cut.tar")
    with pytest.raises(TarFormatError):
        _members(cut)
    stats = DataStats(0)
    assert [s["__key__"] for s in _samples(cut, stats)] == keys[:3]
    assert stats.totals()["bad_shard"] == 1


def test_missing_end_of_archive_blocks(tmp_path):
    """Cut on a member boundary (no end-of-archive zero blocks, as a killed writer may leave): tarfile reads
    it without complaint, and so does the reader: every sample, no bad shard."""
    path, keys = _good_shard(tmp_path)
    end = _offsets(path)[-1][2] + len(_reference(path)[-1][1])
    cut = _cut(path, end + (-end % 512), tmp_path / "cut.tar")
    assert _members(cut) == _reference(path)
    stats = DataStats(0)
    assert [s["__key__"] for s in _samples(cut, stats)] == keys
    assert stats.totals()["bad_shard"] == 0


def test_garbage_is_a_bad_shard(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises((TarFormatError, ValueError)):
        _members(junk)
    stats = DataStats(0)
    assert _samples(junk, stats) == []
    assert stats.totals()["bad_shard"] == 1 and stats.totals()["empty_shard"] == 0


def test_not_a_tar_raises_tar_format_error(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(TarFormatError):
        _members(junk)


def test_truncated_shard_in_the_datasets(tmp_path):
    path, keys = _good_shard(tmp_path, n=6)
    _, _, data_at = _offsets(path)[8]  # inside the 5th sample
    cut = _cut(path, data_at + 10, tmp_path / "cut.tar")
    good = write_shard(tmp_path / "other.tar", [good_sample(f"o-{i}", 0.5, seed=50 + i) for i in range(3)])
    expect = sorted(keys[:4] + [f"o-{i}" for i in range(3)])
    assert sorted(_eval_keys([cut, good])) == expect
    assert sorted(_train_keys([cut, good])) == expect


# ----------------------------------------------------------------------------- empty shards
@pytest.mark.parametrize("kind", ["zero_bytes", "end_blocks_only", "only_directories"])
def test_empty_shard(tmp_path, kind):
    path = tmp_path / "empty.tar"
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "end_blocks_only":
        _write(path, [])
    else:
        _write(path, [("a", None, tarfile.DIRTYPE, {}), ("a/b", None, tarfile.DIRTYPE, {})])
    assert _members(path) == []
    stats = DataStats(0)
    assert _samples(path, stats) == []
    totals = stats.totals()
    assert totals["empty_shard"] == 1 and totals["bad_shard"] == 0


def test_empty_shards_in_the_datasets(tmp_path):
    empty = _write(tmp_path / "empty.tar", [])
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    good = write_shard(tmp_path / "good.tar", [good_sample(f"g-{i}", 0.5, seed=i) for i in range(3)])
    expect = [f"g-{i}" for i in range(3)]
    assert sorted(_eval_keys([empty, zero, good])) == expect
    assert sorted(_train_keys([empty, good, zero])) == expect
    with pytest.raises(ValueError, match="no usable evaluation sample"):
        EvalAudioDataset([str(empty), str(zero)], DecodeConfig(), LoaderConfig())
    ds = TrainAudioDataset([str(empty), str(zero)], DecodeConfig(crop_samples=SR), LoaderConfig(),
                           resampled=True, batches_per_worker=2)
    with pytest.raises(RuntimeError, match="gave no sample"):
        next(iter(ds))


# ----------------------------------------------------------------------------- non-regular members
def test_directories_links_and_special_files_are_skipped(tmp_path):
    """Directories, symlinks, hard links, FIFOs and device nodes are not members, and do not break the
    grouping of the members around them (a directory between two members of one sample included)."""
    a = _sample_entries(["d/a"])
    entries = [("d", None, tarfile.DIRTYPE, {}), a[0],
               ("d/sub", None, tarfile.DIRTYPE, {}),  # between the two members of sample d/a
               a[1],
               ("d/link.flac", None, tarfile.SYMTYPE, {"linkname": "a.flac"}),
               ("d/hard.flac", None, tarfile.LNKTYPE, {"linkname": "d/a.flac"}),
               ("d/fifo", None, tarfile.FIFOTYPE, {}),
               ("d/dev", None, tarfile.CHRTYPE, {"devmajor": 1, "devminor": 3}),
               ] + _sample_entries(["d/b"])
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = _write(tmp_path / f"special-{fmt}.tar", entries, fmt)
        assert _members(path) == _reference(path)
        samples = _samples(path)
        assert [s["__key__"] for s in samples] == ["d/a", "d/b"]
        assert all(set(s) == {"__key__", "__url__", "flac", "json"} for s in samples)
    assert sorted(_eval_keys([path])) == ["d/a", "d/b"]


def test_contiguous_file_type_is_a_regular_member(tmp_path):
    path = tmp_path / "cont.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in _sample_entries(["c"]):
            _add(tar, name, data, tarfile.CONTTYPE)
    assert [n for n, _ in _members(path)] == ["c.flac", "c.json"]
    assert [s["__key__"] for s in _samples(path)] == ["c"]


# ----------------------------------------------------------------------------- keys and extensions
def test_members_without_extension_or_key(tmp_path):
    """A member without an extension ('README', 'dir/LICENSE') carries no field: it forms no sample and
    does not end the sample around it; webdataset metadata members ('__meta__.json') are skipped too."""
    ab = _sample_entries(["x/a", "x/b"])
    entries = [("README", b"read me"), ("__meta__.json", b"{}"), ab[0], ("x/a", b"no extension"), ab[1],
               ("x/LICENSE", b"text")] + ab[2:] + [("x/__index__.json", b"{}")]
    path = _write(tmp_path / "noext.tar", entries)
    assert _members(path) == _reference(path)
    samples = _samples(path)
    assert [s["__key__"] for s in samples] == ["x/a", "x/b"]
    assert all(set(s) == {"__key__", "__url__", "flac", "json"} for s in samples)
    assert sorted(_eval_keys([path])) == ["x/a", "x/b"]


def test_key_is_up_to_the_first_dot_of_the_basename(tmp_path):
    """webdataset's rule (base_plus_ext): the key ends at the first dot of the file name (dots in directory
    names are kept), the extension is the rest, lower-cased by the reader."""
    flac = audio_bytes(tone(0.5, SR), SR)
    entries = [("v1.2/spk.a/utt.FLAC", flac), ("v1.2/spk.a/utt.JSON", meta("utt", 0.5)),
               ("v1.2/spk.a/seg.part.flac", flac)]
    path = _write(tmp_path / "dots.tar", entries)
    assert _members(path) == _reference(path)
    samples = _samples(path)
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("v1.2/spk.a/utt", ["flac", "json"]), ("v1.2/spk.a/seg", ["part.flac"])]
    ds = EvalAudioDataset([str(path)], DecodeConfig(), LoaderConfig())
    assert [k for b in ds for k in b["keys"]] == ["v1.2/spk.a/utt"]  # "part.flac" is no audio field
    assert ds.stats.totals()["missing_audio"] == 1


def test_sample_split_across_non_adjacent_members(tmp_path):
    """Grouping is by consecutive members (as webdataset's group_by_keys): a key that comes back later
    starts a second sample."""
    a, b = _sample_entries(["a"]), _sample_entries(["b"])
    path = _write(tmp_path / "split.tar", [a[0], b[0], b[1], a[1]])
    got = [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in _samples(path)]
    assert got == [("a", ["flac"]), ("b", ["flac", "json"]), ("a", ["json"])]


# ----------------------------------------------------------------------------- sizes and odd headers
def test_member_sizes_around_block_boundaries(tmp_path):
    sizes = [0, 1, 511, 512, 513, 1023, 1024, 4097]
    entries = [(f"s{n}.bin", bytes(i % 251 for i in range(n))) for n in sizes]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        path = _write(tmp_path / f"sizes-{fmt}.tar", entries, fmt)
        assert _members(path) == _reference(path)


def test_mixed_archive_matches_tarfile_member_for_member(tmp_path):
    """A mixed archive (all formats' features at once) read by both readers, member for member."""
    entries = list(itertools.chain(
        _sample_entries([f"{LONG_DIR}/m{i}" for i in range(3)]),
        [("dir", None, tarfile.DIRTYPE, {}), ("dir/x.txt", b"x" * 700), ("NOEXT", b"")],
        _sample_entries(["último/ñ", "plain"]),
    ))
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = _write(tmp_path / f"mixed-{fmt}.tar", entries, fmt)
        assert _members(path) == _reference(path)


# ----------------------------------------------------------------------------- compression, duplicates, oversize
@pytest.mark.parametrize("compress", ["gz", "xz"])
def test_compressed_shards(tmp_path, compress):
    """tarfile's "r|*" mode (webdataset's) reads compressed shards too; a cut compressed stream is a broken
    shard with the samples before the cut kept."""
    path, keys = _good_shard(tmp_path, n=6)
    raw = path.read_bytes()
    packed = gzip.compress(raw) if compress == "gz" else lzma.compress(raw)
    whole = tmp_path / f"s.tar.{compress}"
    whole.write_bytes(packed)
    assert _members(whole) == _reference(path)
    assert [s["__key__"] for s in _samples(whole)] == keys
    assert sorted(_eval_keys([whole])) == sorted(keys)
    cut = tmp_path / f"cut.tar.{compress}"
    cut.write_bytes(packed[: len(packed) * 2 // 3])
    stats = DataStats(0)
    got = [s["__key__"] for s in _samples(cut, stats)]
    assert 0 < len(got) < len(keys) and got == keys[: len(got)]
    assert stats.totals()["bad_shard"] == 1


def test_duplicate_member_is_counted_and_the_first_kept(tmp_path):
    """Two members with one key and extension (webdataset's group_by_keys rejects the second; the default
    handler raises): the first is kept, the sample and the shard go on, and the repair is counted."""
    a, b = _sample_entries(["a"]), _sample_entries(["b"])
    path = _write(tmp_path / "dup.tar", [a[0], a[1], ("a.flac", b"second"), b[0], b[1]])
    stats = DataStats(0)
    samples = _samples(path, stats)
    assert [s["__key__"] for s in samples] == ["a", "b"]
    assert samples[0]["flac"] == a[0][1]
    assert stats.totals()["duplicate_member"] == 1 and stats.totals()["bad_shard"] == 0


def test_oversize_member_is_skipped_without_reading_it(tmp_path, monkeypatch):
    """A member over MAX_MEMBER_BYTES marks its sample oversize (too_long when decoded) and is passed over
    in the stream without being read into memory: the reader's peak allocation stays far below its size."""
    monkeypatch.setattr(shard_reader, "MAX_MEMBER_BYTES", 1 << 20)
    big = 48 << 20
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in _sample_entries(["before"]):
            _add(tar, name, data)
        info = tarfile.TarInfo("huge.wav")
        info.size = big
        tar.addfile(info, io.BytesIO(bytes(big)))
        _add(tar, "huge.json", meta("huge", 1500.0))
        for name, data in _sample_entries(["after"]):
            _add(tar, name, data)
    tracemalloc.start()
    try:
        samples = _samples(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [s["__key__"] for s in samples] == ["before", "huge", "after"]
    assert samples[1]["__oversize__"] == "wav" and "wav" not in samples[1] and "json" in samples[1]
    assert peak < big // 8, f"peak {peak / 2**20:.1f} MiB while skipping a {big >> 20} MiB member"
    ds = EvalAudioDataset([str(path)], DecodeConfig(), LoaderConfig())
    assert sorted(k for b in ds for k in b["keys"]) == ["after", "before"]
    assert ds.stats.totals()["too_long"] == 1


def test_samples_match_webdatasets_own_pipeline(tmp_path):
    """On valid shards the samples are webdataset's (`wds.WebDataset` over the same files): same keys, same
    fields, same bytes, in the same order, long names, dots and extension-less members included.  One
    difference: a member whose file name starts with "__" (`__meta__.json`) is metadata here, never a
    sample; webdataset skips only names of the form `__*__`, and would hand out a `__meta__` sample."""
    import webdataset as wds

    entries = list(itertools.chain(
        [("__meta__.json", b"{}")],
        _sample_entries([f"{LONG_DIR}/m{i}" for i in range(3)]),
        [("dir", None, tarfile.DIRTYPE, {}), ("dir/x.txt", b"x" * 700), ("NOEXT", b""), ("v1.2/s.a/u.FLAC", b"f")],
        _sample_entries(["último/ñ", "plain"]),
    ))
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = _write(tmp_path / f"wds-{fmt}.tar", entries, fmt)
        ours = _samples(path)
        theirs = [s for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
                  if not _is_meta(s["__key__"])]
        assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs]
        for a, b in zip(ours, theirs):
            assert {k: v for k, v in a.items() if k != "__url__"} == {
                k: v for k, v in b.items() if not k.startswith("__") or k == "__key__"}
