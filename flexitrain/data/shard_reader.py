"""Reading one WebDataset shard: webdataset's own reading path, with bad input counted.

A shard is read as webdataset reads it: opened with `webdataset.gopen` (local paths, `pipe:`, URLs),
its members streamed by Python's `tarfile` in "r|*" mode (plain or compressed tars, as webdataset's
tar_file_iterator), and grouped into samples by webdataset's rules (group_by_keys: consecutive members
sharing a key; `base_plus_ext` splits key and extension at the first dot of the file name; extensions
lower-cased; tests/test_tar_reader.py checks the samples against `webdataset.WebDataset`'s).  Members
whose file name starts with "__" are metadata, never samples (webdataset skips only `__*__` names).
Three things are added for training corpora, where a shard problem must be counted rather than raised
or hidden:

  * `tarfile` ends an archive quietly at a cut or corrupt header after the first member, exactly as at
    the end-of-archive blocks; here it is a broken shard (`_CheckedTarInfo`).
  * A member over MAX_MEMBER_BYTES (e.g. hours of WAV) is skipped without being read into memory; its
    sample is marked `__oversize__` and counted as too_long when decoded.
  * A sample is handed out when the next key's header is read, before that member's data: a shard cut
    inside a member keeps every sample before it (group_by_keys would drop the last complete one).

`iter_shard` never raises for a bad shard: it counts bad_shard (unreadable, truncated, corrupt; the
samples before the damage are kept) or empty_shard (readable, no sample), logs, and ends that shard.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Callable, Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from .stats import DataStats

log = logging.getLogger(__name__)

# A member this large is not read into memory: its sample counts as too_long.
MAX_MEMBER_BYTES = 1 << 28
_META = re.compile(r"(^|/)__[^/]*$")  # webdataset metadata members: __meta__.json, dir/__index__.json


class TarFormatError(Exception):
    """A shard that is not a readable tar archive, or is cut or corrupt part-way."""


class _CheckedTarInfo(tarfile.TarInfo):
    """A cut header or a bad checksum after the first member is an error here; tarfile treats both as
    the end of the archive.  A cut exactly on a member boundary (no end-of-archive blocks, as a killed
    writer may leave) and a zero-byte shard still read as complete."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exn:
            raise TarFormatError(f"{exn} at byte {tar.offset} (shard cut or corrupt)") from None
        except tarfile.EmptyHeaderError:
            if tar.offset == 0:  # zero bytes: an empty shard, not a broken one
                return None
            raise


def tar_members(stream, url: str = "") -> Iterator[tuple[str, Callable[[], bytes | None]]]:
    """(name, read) of the regular members of a tar stream but webdataset's metadata members, in order;
    read() gives the member's bytes, or None for a member over MAX_MEMBER_BYTES (then tarfile passes over
    its data without keeping it), and must be called, if at all, before the next member.  The name comes
    before the data so that a consumer can finish a sample before a read that may fail.  Raises
    TarFormatError for a stream that is not a readable tar or is cut or corrupt part-way."""
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_CheckedTarInfo) as tar:
            for info in tar:
                tar.members = []  # a stream of thousands of members: keep no list of them
                if info.isreg() and not _META.search(info.name):
                    yield info.name, _reader(tar, info, url)
    except tarfile.TarError as exn:
        raise TarFormatError(f"{exn} ({url})" if url else str(exn)) from None


def _reader(tar: tarfile.TarFile, info: tarfile.TarInfo, url: str) -> Callable[[], bytes | None]:
    def read() -> bytes | None:
        if info.size > MAX_MEMBER_BYTES:
            return None
        try:
            return tar.extractfile(info).read()
        except tarfile.TarError as exn:
            raise TarFormatError(f"{exn} in {info.name} ({url})" if url else f"{exn} in {info.name}") from None

    return read


def iter_shard(url: str, stats: DataStats) -> Iterator[dict]:
    """Samples {"__key__", "__url__", ext: bytes} of one shard, grouped as webdataset's group_by_keys groups
    them (consecutive members sharing a key; names without an extension skipped; a repeated extension
    keeps the first member, counted as duplicate_member).  A sample is handed out as soon as the next
    key's header is read, before that member's data, so a cut inside a member loses only its sample."""
    stats.add("shards_read")
    count, current, broken = 0, None, False
    try:
        stream = gopen(url, "rb")
    except Exception as exn:
        stats.add("bad_shard")
        log.warning("cannot open shard %s: %s", url, exn)
        return
    try:
        for name, read in tar_members(stream, url):
            key, ext = base_plus_ext(name)
            if key is None:
                continue
            if current is None or current["__key__"] != key:
                if current is not None:
                    count += 1
                    yield current
                current = {"__key__": key, "__url__": url}
            ext = ext.lower()
            if ext in current:
                stats.add("duplicate_member")
                log.warning("shard %s: a second %r member for key %r (the first is kept)", url, ext, key)
                continue
            data = read()
            if data is None:
                current["__oversize__"] = ext
            else:
                current[ext] = data
        if current is not None:
            count += 1
            yield current
    except (TarFormatError, OSError, EOFError) as exn:  # EOFError: a cut gzip/bz2/xz stream
        broken = True
        stats.add("bad_shard")
        log.warning("unreadable or truncated shard %s after %d samples: %s", url, count, exn)
    finally:
        try:
            stream.close()
        except Exception:  # a pipe: whose command failed raises here; the shard is already counted
            pass
    if count == 0 and not broken:
        stats.add("empty_shard")
