"""Resume as it was (train/run_config.py), on the real config tree composed as Hydra composes it:
what the command line may change on resume, what it may not, and the group options recorded."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from radial_lora.configs.schema import CONFIG_DIR, ConfigError, register_configs
from radial_lora.train.run_config import resume_config, resumed_choices


def composed(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=False)


def saved_run():
    """What a checkpoint holds: the resolved config of the run as it was started."""
    return OmegaConf.create(OmegaConf.to_container(composed("optim.lr=2e-4", "train.steps=100"), resolve=True))


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
