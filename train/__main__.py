"""`python -m train [+experiment=NAME] [key=value ...]`: compose the config with Hydra and train.

With no experiment this runs the offline CPU demo (configs/train.yaml's defaults).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

# Before anything touches CUDA: the allocator reads this once. Long clips in size buckets allocate
# blocks of changing sizes; without expandable segments the 14B's step at 4x on 2 H100s
# (scripts/bench_train_step.py) ran out of memory with 3.6 GB reserved but fragmented, and fit
# with them (docs/benchmarks/train_step.md). A user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from radial_lora.train.config import CONFIG_DIR, ConfigError, register_configs, typed_config, validate  # noqa: E402

register_configs()

# `kill -USR2 PID` prints every thread's stack to stderr and the run goes on: how to see where a
# stuck run waits (a collective one rank never joined, a compile, a data worker).
faulthandler.register(signal.SIGUSR2, all_threads=True)  # (USR1 and TERM: stop cleanly)

# Errors that mean "the run was asked for something that cannot be": reported in one line, no
# traceback. Anything else is a bug and keeps its traceback.
# (The loop adds TrainingDiverged: a run that stopped on a non-finite loss, with nothing saved.)
USER_ERRORS = (ConfigError, FileNotFoundError, FileExistsError)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(dict_cfg: DictConfig) -> None:
    """Turn the composed config into typed dataclasses, check it, train, report the LoRA path."""
    from radial_lora.train.loop import TrainingDiverged, train

    try:
        cfg = typed_config(dict_cfg)
        validate(cfg)
        lora_file = train(cfg, OmegaConf.to_container(dict_cfg, resolve=True))
    except (*USER_ERRORS, TrainingDiverged) as err:
        sys.exit(f"error: {err}")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"LoRA exported to {lora_file}", flush=True)


if __name__ == "__main__":
    main()
