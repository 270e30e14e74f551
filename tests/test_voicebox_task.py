"""VoiceboxTask: targets (mask units, on-the-fly codec), overfitting a few utterances, resume state."""
import math
from dataclasses import asdict

import lightning as L
import pytest
import torch

from flexitrain.models.tts.voicebox import TINY_CONFIG
from flexitrain.tasks.voicebox import VoiceboxTask, expand_token_codes, flow_matching_loss

SR, N, B = 16000, 20480, 4  # 1.28 s: 64 mel frames, 16 codes


pytestmark = pytest.mark.usefixtures("one_thread")


def harmonic_batch(lengths=(N,) * B) -> dict:
    g = torch.Generator().manual_seed(0)
    t = torch.arange(N) / SR
    f0 = torch.tensor([120.0, 180.0, 240.0, 300.0])[: len(lengths), None]
    audio = sum(torch.sin(2 * math.pi * k * f0 * t) / k for k in range(1, 6)) * 0.1
    audio = audio * (0.6 + 0.4 * torch.sin(2 * math.pi * 1.5 * t + f0 / 50))
    audio = audio * (torch.arange(N)[None] < torch.tensor(lengths)[:, None])
    return {"audio": audio[:, None].float(), "lengths": torch.tensor(lengths),
            "semantic_codes": torch.randint(0, 1024, (len(lengths), 16), generator=g),
            "semantic_repr": torch.randn(len(lengths), 32, 16, generator=g)}


def test_prompt_mask_in_true_units_and_official_bug_flag():
    batch = harmonic_batch((20480, 16000))
    fixed = VoiceboxTask(model=asdict(TINY_CONFIG))
    buggy = VoiceboxTask(model=asdict(TINY_CONFIG), official_mask_units=True)
    assert fixed.targets(batch, 0.91)["x_mask"].sum(1).tolist() == [64, 50]  # L16 / 320
    assert buggy.targets(batch, 0.91)["x_mask"].sum(1).tolist() == [42, 33]  # L16 / 24000 * 50


def test_expand_token_codes():
    codes = torch.tensor([[3, 4, 5], [7, 8, 0]])
    lengths = torch.tensor([[1, 2, 1], [3, 1, 0]])
    assert expand_token_codes(codes, lengths, 5).tolist() == [[3, 4, 4, 5, 0], [7, 7, 7, 8, 0]]


def on_the_fly_task() -> VoiceboxTask:
    return VoiceboxTask(
        model={**asdict(TINY_CONFIG), "cond_codebook_size": 32768, "ssl_feature_dim": 512,
               "repa_projection_dim": 512},
        codec={"model": {"_target_": "flexitrain.models.codec.FlexiCodec", "sample_rate": 16000, "encoder_dim": 16,
                         "encoder_rates": [4, 4, 5, 8, 2], "decoder_rates": [2, 8, 5, 4, 4], "latent_dim": 64,
                         "n_codebooks": 2, "codebook_size": 64, "semantic_codebook_size": 32768,
                         "use_similarity_alignment": True, "semantic_downsample_factor": 1.33333,
                         "ssl_dim": 512, "transformer_num_layers": 1, "transformer_dim": 64,
                         "transformer_dim_feedforward": 128, "transformer_num_heads": 2, "convnext_dim": 64,
                         "convnext_layers": 1, "agg_transformer_num_layers": 1, "agg_transformer_dim": 64,
                         "agg_transformer_num_heads": 2, "agg_transformer_dim_feedforward": 128,
                         "decoder_dim": 64, "max_tokens_per_group": 8, "similarity_threshold": 0.91},
               "random_init": True},
        teacher={"random_init": True, "num_blocks": 1})


def test_on_the_fly_codec_targets():
    task = on_the_fly_task()
    batch = harmonic_batch((N, N, 16000, 12800))
    del batch["semantic_codes"], batch["semantic_repr"]
    tg = task.targets(batch, 0.91)
    assert tg["codes"].shape[0] == B and abs(4 * tg["codes"].shape[1] - tg["mel"].shape[1]) <= 8
    assert int(tg["codes"].min()) >= 0 and int(tg["codes"].max()) < 32768
    assert tg["repa"].shape == (B, 512, tg["codes"].shape[1])
    loss, logs = flow_matching_loss(task.nar, tg["mel"], tg["x_mask"], tg["codes"], tg["repa"])
    assert torch.isfinite(loss) and "repa_loss" in logs


def test_overfits_a_few_utterances():
    batch = harmonic_batch()

    class Repeat(torch.utils.data.Dataset):
        def __len__(self):
            return 150

        def __getitem__(self, i):
            return batch

    task = VoiceboxTask(model=asdict(TINY_CONFIG), optimizer={"lr": 2e-3}, validation={"n_timesteps": 8})
    tg = task.targets(batch, 0.91)

    def probe():
        task.eval()
        with torch.no_grad():
            _, logs = flow_matching_loss(task.nar, tg["mel"], tg["x_mask"], tg["codes"], tg["repa"],
                                         cond_drop_prob=0.0, generator=torch.Generator().manual_seed(1))
            dist = task.sample_distance(tg)
        task.train()
        return float(logs["diff_loss"]), float(logs["repa_loss"]), float(dist)

    before = probe()
    trainer = L.Trainer(max_steps=150, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, torch.utils.data.DataLoader(Repeat(), batch_size=None))
    after = probe()
    assert after[0] < 0.7 * before[0], (before, after)  # flow loss
    assert after[1] < 0.5 * before[1], (before, after)  # REPA loss
    assert after[2] < 0.6 * before[2], (before, after)  # prompt-infilled sample approaches the true mel


def test_resume_state_continues_the_draws():
    task = VoiceboxTask(model=asdict(TINY_CONFIG))
    ckpt = {}
    task.on_save_checkpoint(ckpt)
    a = torch.rand(3, generator=task._gen)
    task.on_load_checkpoint(ckpt)
    assert torch.equal(torch.rand(3, generator=task._gen), a)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="use_repa=true needs a model"):
        VoiceboxTask(model={**asdict(TINY_CONFIG), "use_repa": False}, use_repa=True)
    with pytest.raises(ValueError, match="needs `checkpoint`"):
        VoiceboxTask(model=asdict(TINY_CONFIG), codec={"checkpoint": None})
    task = VoiceboxTask(model=asdict(TINY_CONFIG))
    batch = harmonic_batch()
    del batch["semantic_codes"]
    with pytest.raises(ValueError, match="configure task.codec"):
        task.targets(batch, 0.91)


def test_pre_extracted_merged_codes_are_expanded():
    task = VoiceboxTask(model=asdict(TINY_CONFIG))
    batch = harmonic_batch((N, N))
    batch["semantic_codes"] = torch.tensor([[1, 2, 3], [4, 5, 0]])
    batch["token_lengths"] = torch.tensor([[8, 4, 4], [10, 6, 0]])
    codes = task.targets(batch, 0.91)["codes"]
    assert codes.shape == (2, 16) and codes[0, 8:12].tolist() == [2] * 4 and codes[1, 10:].tolist() == [5] * 6


def test_hparams_from_hydra_configs_load_weights_only(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"model": asdict(TINY_CONFIG), "thresholds": [0.91, 0.86],
                            "optimizer": {"betas": [0.9, 0.99]}})
    task = VoiceboxTask(model=cfg.model, thresholds=cfg.thresholds, optimizer=cfg.optimizer)
    torch.save({"hyper_parameters": dict(task.hparams)}, tmp_path / "h.ckpt")
    assert torch.load(tmp_path / "h.ckpt", weights_only=True)["hyper_parameters"]["thresholds"] == [0.91, 0.86]


@pytest.mark.parametrize("threshold", [0.5, 0.91, 1.0])
def test_on_the_fly_codes_equal_expanded_encode_codes(threshold):
    """The sync-free frame codes (static group axis, no host reads) equal the inference path's: encode, then
    each token's code copied to its frames."""
    task = on_the_fly_task()
    codec, teacher = task._frozen["codec"], task._frozen["teacher"]
    batch = harmonic_batch((N, N, 16000, 12800))
    audio, lengths = batch["audio"], batch["lengths"]
    feats, feat_lens = teacher(audio[:, 0], lengths)
    tokens = codec.encode(audio, lengths, threshold=threshold, num_quantizers=1, semantic_features=feats,
                          semantic_lengths=feat_lens)
    got = task._codec_targets(audio, lengths, threshold)[0]
    want = expand_token_codes(tokens.semantic_codes, tokens.token_lengths, got.shape[1])
    assert torch.equal(got, want)
    assert (tokens.num_tokens < tokens.token_lengths.sum(1)).any() or threshold == 1.0  # merges happened


def test_batches_are_checked_on_the_host():
    task = on_the_fly_task()
    short = harmonic_batch((N, N, 16000, 300))
    del short["semantic_codes"]
    with pytest.raises(ValueError, match=r"batch lengths must lie in \[400, 20480\]"):
        task.on_before_batch_transfer(short, 0)
    plain = VoiceboxTask(model=asdict(TINY_CONFIG))
    bad = harmonic_batch()
    bad["semantic_codes"][0, 3] = 5000
    with pytest.raises(ValueError, match=r"semantic_codes must lie in \[0, 1024\)"):
        plain.on_before_batch_transfer(bad, 0)
    assert plain.on_before_batch_transfer(harmonic_batch(), 0)["lengths"].tolist() == [N] * B
