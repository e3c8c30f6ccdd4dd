"""The Hydra tree composes into the typed schema; bad keys and values fail with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from radial_lora.configs.schema import Config, ConfigError, register_configs, typed_config, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ["model", "data", "attention", "lora", "optim", "trainer", "logger"]
register_configs()


def compose_cfg(*overrides: str):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in options(g)] + [f"+experiment={e}" for e in options("experiment")]
)
def test_every_group_option_composes_into_the_schema(override):
    cfg = typed_config(compose_cfg(override, "data.root=/videos", "data.demo=false", "data.cache=/latents"))
    assert isinstance(cfg, Config)
    validate(cfg)


def test_wan_experiments():
    wan4x = typed_config(compose_cfg("+experiment=wan_4x", "data.root=/videos"))
    assert (wan4x.model.id, wan4x.trainer.strategy.value, wan4x.attention.backend.value) == (
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        "zero2",
        "triton",
    )
    assert wan4x.data.frames[0] == 321 and wan4x.lora.rank == 128 and wan4x.data.demo is False
    assert wan4x.model.compile_blocks and wan4x.model.gradient_checkpointing
    # Kept attention outputs: as many blocks as fit 30 GB at 4x, all at 2x, none for the 14B.
    wan2x = typed_config(compose_cfg("+experiment=wan_2x", "data.root=/videos"))
    assert (wan4x.model.checkpoint_keep_attention, wan2x.model.checkpoint_keep_attention) == (10, -1)
    validate(wan4x)
    wan14b = typed_config(compose_cfg("+experiment=wan14b_4x", "data.root=/videos"))
    assert (wan14b.model.id, wan14b.trainer.strategy.value, wan14b.data.sizes[0]) == (
        "Wan-AI/Wan2.1-T2V-14B-Diffusers",
        "zero3",
        [720, 1280],
    )
    assert wan14b.model.checkpoint_keep_attention == 0
    with pytest.raises(ConfigError, match="set exactly one of data.root, data.metadata or data.mix"):
        validate(typed_config(compose_cfg("+experiment=wan_4x")))


def _leaves(node, prefix: str = "") -> dict:
    """{dotted key: value} of a YAML mapping; lists are values."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _own_settings(path: Path) -> dict:
    """The keys a config file sets itself (not its defaults list or Hydra's settings)."""
    from omegaconf import OmegaConf

    body = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    return _leaves({k: v for k, v in body.items() if k not in ("defaults", "hydra")})


def _schema_default(key: str):
    import typing

    from omegaconf import OmegaConf

    group, _, rest = key.partition(".")
    kind = typing.get_type_hints(Config).get(group)
    if rest and kind is not None and group != "train":
        return OmegaConf.select(OmegaConf.structured(kind), rest, default="<no default>")
    return OmegaConf.select(OmegaConf.structured(Config), key, default="<no default>")


@pytest.mark.parametrize(
    "path",
    [CONFIGS / "train.yaml"] + [CONFIGS / g / f"{o}.yaml" for g in GROUPS for o in options(g)],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_group_files_state_only_what_they_change_from_the_schema(path):
    """The schema (configs/schema.py) is the one home of every default; a group file that restated
    one would be a second home that drifts. Group keys are relative to their group."""
    prefix = "" if path.name == "train.yaml" else f"{path.parent.name}."
    restated = {k: v for k, v in _own_settings(path).items() if _schema_default(prefix + k) == v}
    assert not restated, f"{path.relative_to(CONFIGS)} restates schema defaults: {restated}"


def _base_of(experiment: Path) -> list[str]:
    """The overrides that compose what an experiment builds on: its parent experiment and the
    group options its defaults list selects."""
    from omegaconf import OmegaConf

    base = []
    for entry in OmegaConf.to_container(OmegaConf.load(experiment)).get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            base.append(f"+experiment={entry}")
        elif isinstance(entry, dict):
            ((group, option),) = entry.items()
            base.append(f"{group.removeprefix('override /')}={option}")
    return base


@pytest.mark.parametrize("name", options("experiment"))
def test_experiments_state_only_what_they_change(name):
    """An experiment states what differs from the groups and the experiment it builds on, so a
    value seen there is one the experiment chose, and a group chosen beside it is not overridden."""
    from omegaconf import OmegaConf

    path = CONFIGS / "experiment" / f"{name}.yaml"
    base, full = compose_cfg(*_base_of(path)), compose_cfg(f"+experiment={name}")
    unchanged = {k: v for k in _own_settings(path) if (v := OmegaConf.select(base, k)) == OmegaConf.select(full, k)}
    assert not unchanged, f"experiment/{name}.yaml restates what it builds on: {unchanged}"


def test_a_group_named_beside_an_experiment_wins():
    """`+experiment=wan_4x attention=dense` is the dense arm of the 4x run: the experiment's own
    settings stay, the attention is the group's."""
    cfg = typed_config(compose_cfg("+experiment=wan_4x", "attention=dense", "data.root=/videos"))
    assert (cfg.attention.backend.value, cfg.attention.dense_layers, cfg.lora.rank) == ("dense", 0, 128)


def test_default_is_the_tiny_experiment():
    assert typed_config(compose_cfg()) == typed_config(compose_cfg("+experiment=tiny"))


def test_experiment_is_not_in_the_defaults_list():
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.load(CONFIGS / "train.yaml").defaults)
    groups = [next(iter(d)) if isinstance(d, dict) else d for d in defaults]
    assert "model" in groups and not any("experiment" in g for g in groups)
    for path in (CONFIGS / "experiment").glob("*.yaml"):
        assert path.read_text().startswith("# @package _global_"), path


def test_run_dir_has_no_timestamp():
    # Ranks started a second apart must agree on the run directory.
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert "now" not in str(cfg.hydra.run.dir)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("+optim.lr_warmup=10", "optim.lr_warmup"),  # Hydra lets `+` add keys; we must not
        ("+train.timesteps.sampler=uniform", "train.timesteps.sampler"),
    ],
)
def test_added_unknown_key_fails_naming_it(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        typed_config(compose_cfg(override))


def test_a_weighted_mix_of_datasets_composes():
    cfg = typed_config(
        compose_cfg("data.root=null", "data.demo=false", "data.mix=[{path: /a, weight: 3}, {path: /b.jsonl}]")
    )
    validate(cfg)
    assert [(s.path, s.weight) for s in cfg.data.sources()] == [("/a", 3.0), ("/b.jsonl", 1.0)]


def test_cross_field_checks_name_the_key():
    cfg = typed_config(compose_cfg("data.frames=[33,32]"))
    with pytest.raises(ConfigError, match=r"data\.frames=\[33, 32\] must be 4n\+1"):
        validate(cfg)
    cfg = typed_config(compose_cfg("data.sizes=[[64,60]]"))
    with pytest.raises(ConfigError, match=r"data\.sizes=\[\[64, 60\]\] must be"):
        validate(cfg)
    cfg = typed_config(compose_cfg("+data.metadata=x.csv"))
    with pytest.raises(ConfigError, match="exactly one of data.root, data.metadata or data.mix"):
        validate(cfg)
    cfg = typed_config(compose_cfg("model.checkpoint_keep_attention=4", "model.gradient_checkpointing=false"))
    with pytest.raises(ConfigError, match=r"model\.checkpoint_keep_attention needs model\.gradient_checkpointing"):
        validate(cfg)
    cfg = typed_config(compose_cfg("train.ema_decay=0.999", "trainer=zero2"))
    with pytest.raises(ConfigError, match=r"train\.ema_decay needs each process to hold the trainable weights whole"):
        validate(cfg)
    cfg = typed_config(compose_cfg("train.ema_decay=1.0"))
    with pytest.raises(ConfigError, match=r"train\.ema_decay=1\.0 must be in \[0, 1\)"):
        validate(cfg)
    cfg = typed_config(compose_cfg("train.condition_frames=2", "trainer.sequence_parallel=2"))
    with pytest.raises(ConfigError, match=r"train\.condition_frames is not supported with trainer\.sequence_parallel"):
        validate(cfg)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lr_warmup=10", "optim.lr_warmup"),
        ("optim.lr=fast", "optim.lr"),
        ("train.timesteps.sampling=cubic", "train.timesteps.sampling"),
        ("data.frames=[16]", "data.frames=[16]"),
        ("data.on_error=ignore", "Invalid value 'ignore', expected one of [skip, raise]"),
        ("+lora.ranks=4", "lora.ranks"),
        ("lora.alpha=0", "lora.alpha=0.0 must be > 0"),
        ("lora.dropout=2.0", "lora.dropout=2.0 must be in [0, 1)"),
        ("optim.lr=-1", "optim.lr=-1.0 must be > 0"),
        ("optim.warmup_steps=-5", "optim.warmup_steps=-5 must be >= 0"),
        ("optim.max_grad_norm=-1", "optim.max_grad_norm=-1.0 must be >= 0"),
        ("optim.scheduler=cosnie", "Invalid value 'cosnie', expected one of [linear, cosine,"),
    ],
)
def test_cli_rejects_bad_config_before_loading_anything(tmp_path, override, needle):
    from conftest import run_train

    proc = run_train(tmp_path, override, timeout=120)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / ".cache").exists()  # failed before building or generating anything


def test_an_experiment_that_needs_a_latent_cache_says_so(train_cli):
    """wan14b_4x sets data.require_cache: training it without data.cache fails in one line, before
    any model is loaded (the 14B cannot hold the VAE and text encoder beside its step)."""
    proc = train_cli("data.require_cache=true", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data.cache is required here (data.require_cache)")


def test_scheduler_names_are_diffusers():
    from diffusers.optimization import SchedulerType

    from radial_lora.configs.schema import SCHEDULERS

    assert set(SCHEDULERS) == {s.value for s in SchedulerType}


def test_lora_targets_that_match_nothing_fail_at_start(train_cli):
    """A misspelled target among good ones: one line before any data is scanned or model loaded."""
    proc = train_cli("lora.target_modules=[to_q,to_kk]", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "lora.target_modules: 'to_kk' matches no module of Wan's transformer" in proc.stderr
    assert "attn1.to_k" in proc.stderr and "data: " not in proc.stdout
