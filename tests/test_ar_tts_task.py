"""ARTTSTask: overfitting a handful of utterances (token CE and duration loss go down, greedy decoding
reproduces the training tokens); pre-extracted (tools/extract_tokens.py) and on-the-fly targets give
identical batches. A tiny deterministic fake codec stands in for FlexiCodec."""

import io
import json
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from flexitrain.models.tts.ar_tts import ARTTSModel
from flexitrain.models.tts.sampling import SamplingConfig, generate
from flexitrain.tasks.ar_tts import ARTTSTask
from flexitrain.tasks.ar_tts_data import ARTTSDataset, codec_targets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

HOP = 1280  # 16 kHz / 12.5 Hz


class FakeCodec:
    """Frames of 80 ms -> code = quantised log-energy; neighbours whose codes differ by at most
    round((1 - threshold) * 40) are merged (at most 8 per token). Same interface as FlexiCodec.encode."""

    vocab = 50

    def encode(self, audio, lengths, threshold=0.91, num_quantizers=1, semantic_features=None, semantic_lengths=None):
        assert num_quantizers == 1
        frames = (lengths // HOP).tolist()
        codes, durs = [], []
        for b, n in enumerate(frames):
            x = audio[b, : n * HOP].view(n, HOP)
            level = (10 * torch.log10(x.pow(2).mean(1) + 1e-8)).round().long().clamp(-60, -11) + 60
            c, d = [], []
            for v in level.tolist():
                if c and abs(v - c[-1]) <= round((1 - threshold) * 40) and d[-1] < 8:
                    d[-1] += 1
                else:
                    c.append(v)
                    d.append(1)
            codes.append(c)
            durs.append(d)
        g = max(len(c) for c in codes)
        out = SimpleNamespace(semantic_codes=torch.zeros(len(codes), g, dtype=torch.long),
                              token_lengths=torch.zeros(len(codes), g, dtype=torch.long),
                              num_tokens=torch.tensor([len(c) for c in codes]))
        for b, (c, d) in enumerate(zip(codes, durs)):
            out.semantic_codes[b, : len(c)] = torch.tensor(c)
            out.token_lengths[b, : len(d)] = torch.tensor(d)
        return out


def utterance(seed: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    env = np.repeat(rng.uniform(0.002, 0.5, size=n // 3200 + 1), 3200)[:n]  # 0.2 s loudness steps
    return (rng.standard_normal(n) * env).astype(np.float32)


def write_corpus(path: Path, n: int = 6) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path / "shard-000000.tar", "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            sf.write(buf, utterance(i, 1.0 + 0.3 * i), 16000, format="FLAC", subtype="PCM_16")
            meta = json.dumps({"text": f"sentence number {i}", "speaker": "s0", "language": "en"}).encode()
            for ext, data in (("flac", buf.getvalue()), ("json", meta)):
                info = tarfile.TarInfo(f"utt{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


MODEL = dict(text_token_size=51866, speech_token_size=FakeCodec.vocab, text_encoder_dim=64, text_encoder_heads=4,
             text_encoder_ffn=128, text_encoder_blocks=1, llm_dim=64, llm_heads=4, llm_ffn=128, llm_blocks=2,
             dropout_rate=0.0, positional_dropout_rate=0.0, spk_embed_dim=8)


def test_overfit_handful_of_utterances(one_thread):
    torch.manual_seed(0)
    codec = FakeCodec()
    audio = [torch.from_numpy(utterance(i, 1.2 + 0.2 * i)) for i in range(4)]
    lengths = torch.tensor([len(a) for a in audio])
    wav = torch.zeros(4, int(lengths.max()))
    for i, a in enumerate(audio):
        wav[i, : len(a)] = a
    text = torch.randint(1, 1000, (4, 7))
    batch = {"text": text, "text_lengths": torch.tensor([7, 6, 5, 7]), "audio": wav, "audio_lengths": lengths}
    task = ARTTSTask({**MODEL, "text_token_size": 1000}, targets={"source": "codec", "thresholds": [0.86, 0.91]},
                     codec=codec, teacher=None)
    opt = torch.optim.AdamW(task.model.parameters(), lr=3e-3)
    first = {}
    for step in range(150):
        thr = [0.86, 0.91][step % 2]
        out = task.loss(batch, thr)
        first.setdefault(thr, (out.token_loss.item(), out.duration_loss.item()))
        opt.zero_grad()
        out.total_loss.backward()
        opt.step()
    task.model.eval()
    for thr in (0.86, 0.91):
        with torch.no_grad():
            out = task.loss(batch, thr)
        assert out.token_loss.item() < 0.05 * first[thr][0], (thr, out.token_loss.item(), first[thr])
        assert out.duration_loss.item() < 0.05 * first[thr][1], (thr, out.duration_loss.item(), first[thr])
        codes, durs, num = codec_targets(codec, None, wav, lengths, thr)
        for i in range(4):
            res = generate(task.model, text[i: i + 1, : batch["text_lengths"][i]], thr,
                           config=SamplingConfig(top_k=1, duration_top_k=1, max_tokens=40))
            assert res.stopped_by_eos
            assert res.tokens[0].tolist() == codes[i, : num[i]].tolist()
            assert res.durations[0].tolist() == durs[i, : num[i]].tolist()


def test_extracted_and_on_the_fly_targets_identical(tmp_path):
    import extract_tokens

    src = write_corpus(tmp_path / "raw")
    codec, thresholds = FakeCodec(), [0.86, 0.91]
    stats = extract_tokens.extract_dir(sorted(src.glob("*.tar")), tmp_path / "tok", codec, None, thresholds,
                                       "fake", batch_seconds=3.0)
    assert stats == {"shards": 1, "skipped_existing": 0, "items": 6}
    with tarfile.open(tmp_path / "tok" / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert "utt000.flac" in names and "utt000.json" in names and "utt000.tokens.json" in names
    # a restart skips finished shards
    assert extract_tokens.extract_dir(sorted(src.glob("*.tar")), tmp_path / "tok", codec, None, thresholds,
                                      "fake")["skipped_existing"] == 1

    common = dict(thresholds=thresholds, token_budget=10_000, max_batch_size=64, shuffle=False, repeat=False, g2p=False)
    (fly,) = list(ARTTSDataset([str(src / "shard-000000.tar")], source="codec", **common))
    (pre,) = list(ARTTSDataset([str(tmp_path / "tok" / "shard-000000.tar")], source="shards", **common))
    order = [pre["keys"].index(k) for k in fly["keys"]]
    assert sorted(fly["keys"]) == sorted(pre["keys"]) and len(order) == 6
    torch.testing.assert_close(pre["text"][order], fly["text"])
    task_fly = ARTTSTask(MODEL, targets={"source": "codec", "thresholds": thresholds}, codec=codec)
    task_pre = ARTTSTask(MODEL, targets={"source": "shards", "thresholds": thresholds})
    task_cached = ARTTSTask(MODEL, targets={"source": "codec", "thresholds": thresholds, "cache": True}, codec=codec)
    part = {k: (v[:3] if torch.is_tensor(v) else v[:3]) for k, v in fly.items()}
    task_cached.targets(part, 0.91)  # fills the cache for half of the items
    for thr in thresholds:
        a = task_fly.targets(fly, thr)
        for _ in range(2):  # partly / fully cached
            for x, y in zip(a, task_cached.targets(fly, thr)):
                assert torch.equal(x, y), thr
        b = task_pre.targets({k: (v[order] if torch.is_tensor(v) else v) for k, v in pre.items()}, thr)
        for x, y in zip(a, b):
            assert torch.equal(x, y), thr
        assert (a[1][a[1] > 0] <= 8).all() and a[2].min() > 0
    with pytest.raises(KeyError, match="no pre-extracted targets for threshold 0.8"):
        task_pre.targets(pre, 0.8)


def test_shard_without_tokens_and_bad_config(tmp_path):
    src = write_corpus(tmp_path / "raw", n=1)
    ds = ARTTSDataset([str(src / "shard-000000.tar")], thresholds=[0.91], source="shards", repeat=False, g2p=False)
    with pytest.raises(ValueError, match="samples have no tokens.json; run tools/extract_tokens.py"):
        list(ds)
    with pytest.raises(ValueError, match="needs targets.codec_ckpt"):
        ARTTSTask(MODEL, targets={"source": "codec"})
    with pytest.raises(ValueError, match="frame-rate options"):
        ARTTSTask(MODEL, targets={"source": "shards", "thresholds": [1.0]})


def test_lightning_fit_and_resume(tmp_path, one_thread):
    import lightning as L

    from flexitrain.tasks.ar_tts_data import ARTTSDataModule

    src = write_corpus(tmp_path / "raw", n=4)
    dm = ARTTSDataModule(str(src / "shard-000000.tar"), str(src / "shard-000000.tar"), source="codec",
                         token_budget=400, max_batch_size=2, buffer_size=4, num_workers=0, g2p=False)

    def fit(steps, ckpt=None):
        task = ARTTSTask(MODEL, targets={"source": "codec", "thresholds": [0.86, 0.91]}, codec=FakeCodec(),
                         scheduler={"warmup_steps": 2, "total_steps": 4}, ema={"decay": 0.9, "start_step": 1},
                         validation={"max_tokens": 20})
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=1, val_check_interval=2,
                            default_root_dir=str(tmp_path), enable_checkpointing=False)
        trainer.fit(task, datamodule=dm, ckpt_path=ckpt)
        return trainer, task

    trainer, task = fit(2)
    assert trainer.global_step == 2 and "val/loss" in trainer.callback_metrics
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    state = torch.load(tmp_path / "a.ckpt", weights_only=True)["state_dict"]
    assert all(k.startswith("model.") for k in state)  # the frozen codec is not saved
    # EMA (task.ema): one update per optimiser step, checkpointed, restored exactly on resume
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert task.ema.num_updates == 2 and ckpt["ema"]["num_updates"] == 2
    assert all(torch.equal(ckpt["ema"]["weights"][n], s) for n, s in zip(task.ema.names, task.ema.shadow))
    # a sample decoded at validation, written as text in the run directory (no logger)
    sample = next((tmp_path / "samples").glob("step_*/val_sample__tokens.txt")).read_text()
    assert "threshold 0.86: generated" in sample and "threshold 0.91: generated" in sample
    assert sum(k.startswith("val/sample_tokens_per_second_") for k in trainer.callback_metrics) == 2
    trainer2, task2 = fit(3, str(tmp_path / "a.ckpt"))
    assert trainer2.global_step == 3 and task2.ema.num_updates == 3


def test_batches_are_checked_on_the_host_and_not_in_the_step():
    """The task checks text ids and pre-extracted targets before the batch moves (free on the host); the model's
    own checks, a device sync each on a GPU, are off in the task and on for direct use."""
    task = ARTTSTask(MODEL, targets={"source": "shards", "thresholds": [0.91]})
    assert not task.model.checks_in_forward and ARTTSModel(**MODEL).checks_in_forward
    batch = {"text": torch.tensor([[3, 4, 5]]), "text_lengths": torch.tensor([3]),
             "speech/0.91": torch.tensor([[1, 2, 0]]), "speech_lengths/0.91": torch.tensor([2]),
             "durations/0.91": torch.tensor([[1, 10, 0]])}
    with pytest.raises(ValueError, match=r"durations of valid tokens must lie in \[1, 9\], got \[1, 10\]"):
        task.on_before_batch_transfer(batch, 0)
    batch["durations/0.91"][0, 1] = 2
    assert task.on_before_batch_transfer(batch, 0) is batch
    batch["text"][0, 0] = MODEL["text_token_size"]
    with pytest.raises(ValueError, match="text ids must lie in"):
        task.on_before_batch_transfer(batch, 0)


def test_item_without_tokens_is_skipped_and_counted(tmp_path):
    """extract_tokens leaves an item whose audio it could not decode without tokens.json: training skips it."""
    src = write_corpus(tmp_path / "raw", n=3)
    out = tmp_path / "tok" / "shard-000000.tar"
    out.parent.mkdir()
    with tarfile.open(src / "shard-000000.tar") as tin, tarfile.open(out, "w") as tout:
        for m in tin.getmembers():
            tout.addfile(m, tin.extractfile(m))
            if m.name.endswith(".json") and not m.name.startswith("utt001"):
                data = json.dumps({"t0.91": {"codes": [1, 2, 3], "durations": [1, 2, 1]}}).encode()
                info = tarfile.TarInfo(m.name.replace(".json", ".tokens.json"))
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))
    ds = ARTTSDataset([str(out)], thresholds=[0.91], source="shards", repeat=False, g2p=False, shuffle=False)
    items = [it for batch in ds for it in batch["keys"]]
    assert sorted(items) == ["utt000", "utt002"]
