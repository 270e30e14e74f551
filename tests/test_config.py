"""Every config group and recipe composes; the CLI lists recipes and prints resolved configs."""
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from flexitrain.utils.config import compose, config_dir, recipe_names
from flexitrain.cluster import resolve_resume_checkpoint as find_resume_checkpoint
from flexitrain.utils.run_dir import stable_run_id

REPO = config_dir().parent


def test_recipes_exist():
    assert {"codec_demo", "codec_12hz", "codec_8hz", "codec_6hz"} <= set(recipe_names())


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_composes_and_resolves(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXITRAIN_ROOT", str(tmp_path))
    cfg = compose([f"recipe={recipe}"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert plain["paths"]["output_dir"] == f"{tmp_path}/runs/{cfg.experiment}/main"
    assert plain["hydra"]["run"]["dir"] == plain["paths"]["output_dir"]
    for group in ("data", "model", "task", "trainer"):
        assert "_target_" in plain[group], group


@pytest.mark.parametrize("group", ["data", "model", "task", "trainer", "logger", "callbacks"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (config_dir() / group).glob("*.yaml")):
        cfg = compose([f"{group}={option}"])
        OmegaConf.to_container(cfg[group], resolve=True)


def test_run_dir_is_stable_and_named_from_experiment(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXITRAIN_ROOT", str(tmp_path))
    a = compose(["recipe=codec_demo", "run_name=r1"]).paths.output_dir
    b = compose(["recipe=codec_demo", "run_name=r1"]).paths.output_dir
    assert a == b == f"{tmp_path}/runs/codec_demo/r1"


def test_resume_resolution(tmp_path):
    ckdir = tmp_path / "checkpoints"
    assert find_resume_checkpoint("auto", ckdir) is None
    ckdir.mkdir()
    import torch

    torch.save({"global_step": 3}, ckdir / "last.ckpt")
    assert find_resume_checkpoint("auto", ckdir) == str(ckdir / "last.ckpt")
    assert find_resume_checkpoint(None, ckdir) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_resume_checkpoint(str(tmp_path / "typo.ckpt"), ckdir)
    assert stable_run_id(tmp_path) == stable_run_id(tmp_path / ".") != stable_run_id(ckdir)


def _train_cli(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_help_lists_groups_and_recipes():
    out = _train_cli("--help")
    assert out.returncode == 0, out.stderr
    recipe_line = next(line for line in out.stdout.splitlines() if line.startswith("recipe:"))
    for name in recipe_names():
        assert name in recipe_line
    for group in ("data:", "model:", "task:", "trainer:", "callbacks:", "logger:", "paths:"):
        assert group in out.stdout


def test_cfg_job_prints_resolved_recipe():
    out = _train_cli("recipe=codec_demo", "trainer.max_steps=7", "--cfg", "job", "--resolve")
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.experiment == "codec_demo" and cfg.trainer.max_steps == 7
    assert cfg.task.scheduler.total_steps == 7
