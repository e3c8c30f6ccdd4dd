"""Resume as it was (train/run_config.py), on the real config tree composed as Hydra composes it:
what the command line may change on resume, what it may not, and the group options recorded."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from radial_lora.configs.schema import CONFIG_DIR, ConfigError, register_configs, typed_config
from radial_lora.train.run_config import kernel_overrides, resume_config, resumed_choices


def composed(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=False)


def saved_run():
    """What a checkpoint holds: the resolved config of the run as it was started."""
    return OmegaConf.create(
        OmegaConf.to_container(composed("optim.lr=2e-4", "train.steps=100"), resolve=True, enum_to_str=True)
    )  # as config.yaml holds it


def test_resume_takes_the_checkpoints_config_and_only_the_command_lines_changes():
    now = composed("optim.lr=1e-5", "train.steps=300", "lora.rank=4")  # lora.rank: the run's own value
    merged, changes = resume_config(saved_run(), now, ["optim.lr=1e-5", "train.steps=300"], checkpoint_step=50)
    assert changes == ["optim.lr: 0.0002 -> 1e-05", "train.steps: 100 -> 300"]
    assert merged.optim.lr == 1e-5 and merged.train.steps == 300
    assert merged.lora.rank == saved_run().lora.rank  # not named on the command line: the run's own


@pytest.mark.parametrize("override", ["lora.rank=4", "data.batch_size=7", "trainer=zero2"])
def test_resume_refuses_a_change_that_would_reinterpret_the_checkpoint(override):
    key = {"trainer=zero2": "trainer."}.get(override, override.split("=")[0])
    with pytest.raises(ConfigError, match=rf"^{key}.*cannot change on resume"):
        resume_config(saved_run(), composed(override), [override], checkpoint_step=50)


def test_resume_refuses_fewer_steps_than_trained():
    with pytest.raises(ConfigError, match="train.steps=20 is below the checkpoint's step 50"):
        resume_config(saved_run(), composed("train.steps=20"), ["train.steps=20"], checkpoint_step=50)


def test_the_recorded_group_options_follow_the_command_line():
    saved = {"model": "tiny_wan", "trainer": "single", "logger": "wandb"}
    now = {"model": "tiny_wan", "trainer": "ddp", "logger": "wandb"}
    assert resumed_choices(saved, now, ["trainer=ddp", "optim.lr=1e-5"])["trainer"] == "ddp"
    assert resumed_choices(saved, now, ["optim.lr=1e-5"]) == saved  # defaults that moved change nothing
    assert resumed_choices(None, now, []) == now  # a checkpoint that kept no options


def test_kernel_choice_is_config_and_the_environment_override_is_said_and_recorded(monkeypatch):
    """attention.kernels is part of the run's config (so config.yaml and W&B record it); RADIAL_GLUON
    / RADIAL_TRITON_TMA override it with a line saying so, in the config that gets recorded; a bad
    value is one line naming the variable; a resume may change the kernels (same attention)."""
    monkeypatch.delenv("RADIAL_GLUON", raising=False)
    monkeypatch.delenv("RADIAL_TRITON_TMA", raising=False)
    cfg = composed("attention=radial")
    assert kernel_overrides(cfg) == (cfg, [])
    assert (cfg.attention.kernels.gluon, cfg.attention.kernels.tma) == ("auto", "backward")
    monkeypatch.setenv("RADIAL_GLUON", "none")
    changed, notes = kernel_overrides(cfg)
    assert notes == ["RADIAL_GLUON=none (environment) overrides attention.kernels.gluon=auto"]
    assert typed_config(changed).attention.kernels.gluon.value == "none" and cfg.attention.kernels.gluon == "auto"
    monkeypatch.setenv("RADIAL_TRITON_TMA", "sometimes")
    with pytest.raises(ConfigError, match=r"RADIAL_TRITON_TMA=sometimes \(environment\): Invalid value 'sometimes'"):
        kernel_overrides(cfg)
    merged, changes = resume_config(
        saved_run(),
        composed("attention.kernels.gluon=auto_split"),
        ["attention.kernels.gluon=auto_split"],
        checkpoint_step=50,
    )
    assert (
        changes == ["attention.kernels.gluon: 'auto' -> 'auto_split'"]
        and merged.attention.kernels.gluon == "auto_split"
    )
