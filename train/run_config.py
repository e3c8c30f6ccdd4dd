"""The config a run runs with, and the copies of it the run folder keeps.

A fresh start runs the config Hydra composed. A resumed run continues *as it was*: its base is the
config saved in the checkpoint it resumes from (each checkpoint holds the resolved config it was
written under), and only what the command line explicitly changes goes on top, each change listed.
What may change on resume is an allow-list (`RESUMABLE`): how long to train, how often to save,
the learning rate (the schedule's shape stays; its base rate is the new one), logging, loader
speed knobs, the attention kernels (which kernels compute the same attention). Anything else (the model, the LoRA, the data, the attention, the
optimizer's settings) would make the checkpoint's state mean something else, so it is refused in
one line naming the key.

Files in the run folder: `config.yaml` (with `choices.yaml`, its config group options) is the run's
config as first started (never rewritten while checkpoints exist), and `starts/<UTC time>/` holds
each start's effective config, options and command line.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from radial_lora.configs.schema import CONFIG_DIR, KERNEL_ENVIRONMENT, ConfigError

RUN_CONFIG = "config.yaml"
"""The run's config as first started, in the run folder; also each checkpoint's own config."""
CHOICES = "choices.yaml"
"""Beside each config.yaml: the option of each config group it was composed with (model=..., ...)."""
STARTS = "starts"

# Keys a resumed run may change (a key, or a prefix ending in ".").
RESUMABLE = (
    "train.steps",
    "train.stop_after_step",
    "train.checkpoint_every",
    "train.keep_last",
    "train.resume",
    "optim.lr",
    "logger.",
    "data.num_workers",
    "data.prefetch_factor",
    "data.decode_threads",
    "cache_dir",
    "attention.kernels.",
    "validation.",
    "lora.formats",
)
# Settings of one invocation, not of the run: a resumed run takes them from its own command line
# (or their defaults), never from the checkpoint (a stop_after_step that ended the last job must
# not end this one at the same step).
INVOCATION = ("train.resume", "train.stop_after_step")
CONFIG_GROUPS = ("model", "data", "attention", "lora", "optim", "trainer", "logger", "experiment")
_ABSENT = object()


def resumable(key: str) -> bool:
    """Whether `key` may differ from the checkpoint's config when resuming."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def _leaf_keys(node: Any, prefix: str) -> set[str]:
    """Dotted keys of the leaves of a (raw, unresolved) config node; lists count as leaves."""
    if isinstance(node, DictConfig):
        keys: set[str] = set()
        for k in node.keys():
            if k == "defaults" and not prefix:
                continue
            keys |= _leaf_keys(node._get_node(k), f"{prefix}{k}.")
        return keys
    return {prefix.rstrip(".")} if prefix else set()


def keys_set_by(group: str, option: str) -> set[str]:
    """The config keys one group option sets: its file's keys (under the group's package, or at the
    top for `# @package _global_` files such as experiments) and those of the options its own
    defaults list overrides (`override /data: videos`)."""
    path = Path(CONFIG_DIR, group, f"{option}.yaml")
    if not path.is_file():
        return set()  # Hydra has already refused an unknown option
    text = path.read_text()
    node = OmegaConf.create(text)
    is_global = "@package _global_" in text.split("\n", 1)[0]
    keys = _leaf_keys(node, "" if is_global else f"{group}.")
    for entry in node.get("defaults", []) if isinstance(node, DictConfig) else []:
        if isinstance(entry, DictConfig):
            for name, choice in entry.items():
                name = str(name).removeprefix("override ").strip().lstrip("/")
                if name in CONFIG_GROUPS and choice is not None:
                    keys |= keys_set_by(name, str(choice))
    return keys


def command_line_keys(overrides: list[str], saved_choices: dict[str, str] | None = None) -> set[str]:
    """Every config key the command line's overrides set, plain (`optim.lr=1e-5`) or through a
    group option (`trainer=zero2`, `+experiment=wan_4x`). A group option the run already had
    (`saved_choices`, as Hydra recorded them) is a repeat of how the run was started: it sets nothing
    new (the run's own values, e.g. its `data.batch_size=2` on top of `data=videos`, stay)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys: set[str] = set()
    for override in OverridesParser.create().parse_overrides(overrides):
        name = override.key_or_group
        if name.startswith("hydra.") or name == "hydra":
            continue
        if name in CONFIG_GROUPS and not override.is_delete():
            value = override.value()
            for option in value if isinstance(value, list) else [value]:
                if saved_choices is None or saved_choices.get(name) != str(option):
                    keys |= keys_set_by(name, str(option))
        else:
            keys.add(name)
    return keys


def group_choices(hydra_choices) -> dict[str, str]:
    """The run's option of each of our config groups (from HydraConfig's runtime.choices)."""
    return {g: str(hydra_choices[g]) for g in CONFIG_GROUPS if hydra_choices.get(g) is not None}


def resumed_choices(saved: dict[str, str] | None, current: dict[str, str], overrides: list[str]) -> dict[str, str]:
    """A resumed run's group options: the checkpoint's, with those the command line names taken
    from this start (resume_config has checked that what they set may change)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if saved is None:
        return current
    named = {o.key_or_group for o in OverridesParser.create().parse_overrides(overrides)}
    return {**saved, **{g: option for g, option in current.items() if g in named}}


def _select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def resume_config(
    saved: DictConfig,
    composed: DictConfig,
    overrides: list[str],
    checkpoint_step: int,
    saved_choices: dict[str, str] | None = None,
) -> tuple[DictConfig, list[str]]:
    """The checkpoint's config with the command line's explicit changes on top; (config, changes).

    `saved` is the resolved config the checkpoint was written under (and `saved_choices` its group
    options), `composed` what Hydra made of defaults + command line now. Only keys the command line names are compared (defaults that moved
    between versions, or experiment settings not repeated on the command line, change nothing).
    Raises ConfigError, naming the key, for a change a resumed run cannot take.
    """
    resolved = OmegaConf.create(OmegaConf.to_container(composed, resolve=True, enum_to_str=True))
    merged = OmegaConf.create(OmegaConf.to_container(saved, resolve=False))
    changes = []
    for key in INVOCATION:
        OmegaConf.update(merged, key, _select(resolved, key), merge=False, force_add=True)
    for key in sorted(command_line_keys(overrides, saved_choices)):
        old, new = _select(saved, key), _select(resolved, key)
        if old == new or key in ("name", "output_root", *INVOCATION):  # the run folder; this invocation's
            continue
        if not resumable(key):
            shown = "absent" if old is _ABSENT else repr(old)
            raise ConfigError(
                f"{key}: cannot change on resume ({shown} -> {new!r}); a resumed run keeps its model, LoRA, data, "
                f"attention and optimizer settings. Start a new run (name=NEW) to change it; on resume only "
                f"{', '.join(k + '*' if k.endswith('.') else k for k in RESUMABLE)} may change"
            )
        if key == "train.steps" and new < checkpoint_step:
            raise ConfigError(f"train.steps={new} is below the checkpoint's step {checkpoint_step}")
        OmegaConf.update(merged, key, new, merge=False, force_add=True)
        changes.append(f"{key}: {old!r} -> {new!r}")
    return merged, changes


def write_start(
    run_dir: Path, effective: DictConfig, overrides: list[str], choices: dict[str, str], fresh: bool
) -> Path:
    """Keep this start's config, group options and command line in `starts/<UTC time>/` (and, on a
    fresh start, the config and options as the run's own); returns the start's folder. Call on one
    process only."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    folder = Path(run_dir, STARTS, stamp)
    n = 1
    while folder.exists():  # two starts in one second
        folder = Path(run_dir, STARTS, f"{stamp}-{n}")
        n += 1
    folder.mkdir(parents=True)
    OmegaConf.save(effective, folder / RUN_CONFIG, resolve=True)
    OmegaConf.save(OmegaConf.create(list(overrides)), folder / "overrides.yaml")
    OmegaConf.save(OmegaConf.create(choices), folder / CHOICES)
    if fresh:
        OmegaConf.save(effective, Path(run_dir, RUN_CONFIG), resolve=True)
        OmegaConf.save(OmegaConf.create(choices), Path(run_dir, CHOICES))
    return folder


class RunFolderCheck(Callback):
    """Hydra callback (configs/train.yaml): before Hydra opens the run's log file in the run
    folder, make sure the folder can be created and written, so a read-only or full output_root
    is one line naming the folder and the cause instead of a traceback from Hydra's own mkdir.
    It exits (SystemExit) rather than raising: Hydra turns a callback's exceptions into warnings."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.run.dir)
        probe = folder / f".write-test-{os.getpid()}"  # one per process: every rank checks
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise SystemExit(
                f"error: cannot write the run folder {folder} (output_root/name): {err.strerror or err}"
            ) from None


def kernel_overrides(cfg: DictConfig) -> tuple[DictConfig, list[str]]:
    """`cfg` with attention.kernels.* set from their environment variables (KERNEL_ENVIRONMENT)
    where those are set, and a line for each, so the run's log and its recorded config say which
    kernels ran. An invalid value is a ConfigError naming the variable."""
    changed, notes = cfg, []
    for key, variable in KERNEL_ENVIRONMENT.items():
        value = os.environ.get(variable)
        was = OmegaConf.select(cfg, f"attention.kernels.{key}")
        was = getattr(was, "value", was)  # an enum member in a typed config
        if value is None or value == was:
            continue
        if changed is cfg:
            changed = copy.deepcopy(cfg)
        try:
            with open_dict(changed):
                OmegaConf.update(changed, f"attention.kernels.{key}", value)
        except OmegaConfBaseException as err:  # a value the schema's enum does not have
            raise ConfigError(f"{variable}={value} (environment): {str(err.msg).splitlines()[0]}") from None
        notes.append(f"{variable}={value} (environment) overrides attention.kernels.{key}={was}")
    return changed, notes
