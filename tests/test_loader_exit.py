"""A process that exits while a loader iterator still has workers must exit, not hang."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers_shards import write_corpus

TESTS = Path(__file__).parent


@pytest.mark.parametrize("ending", ["return", "raise"])
def test_exit_with_live_loader_workers(tmp_path, ending):
    # The workers ignore SIGTERM (preemption safety), which multiprocessing's exit handler relies
    # on; before worker_exit this script hung forever (it hung a CI run after a failed test).
    write_corpus(tmp_path, n_shards=2, per_shard=6, seconds=(0.3, 1.0))
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(TESTS)!r})
        from flexitrain.data.decode import DecodeConfig
        from flexitrain.data.pipeline import AudioLoader, EvalAudioDataset, LoaderConfig, expand_shards
        ds = EvalAudioDataset(expand_shards({str(tmp_path)!r}), DecodeConfig(),
                              LoaderConfig(batch_seconds=1.0, max_batch_size=2), rank=0, world_size=1, num_workers=2)
        it = iter(AudioLoader(ds, num_workers=2))
        first = next(it)
        from flexitrain.data.worker_exit import _live_iterators
        print("workers", *[w.pid for live in _live_iterators for w in live._workers], flush=True)
        if {ending!r} == "raise":
            raise RuntimeError("a training script fails with the loader open")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == (0 if ending == "return" else 1), proc.stderr[-2000:]
    pids = [int(p) for p in proc.stdout.split("workers", 1)[1].split()]
    assert len(pids) == 2
    for pid in pids:  # the workers are gone too, not orphaned
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
