"""What a run prints: Lightning's messages that a user cannot act on are filtered out, each by its
message and the module that emits it; every other warning is shown as before."""

from __future__ import annotations

import logging
import os
import re
import warnings

from lightning.fabric.utilities.warnings import PossibleUserWarning

LITLOGGER_TIP = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"


def _not_the_litlogger_tip(record: logging.LogRecord) -> bool:
    # An advertisement Lightning's logger connector prints for every Trainer.
    return not (record.module == "logger_connector" and record.getMessage().startswith(LITLOGGER_TIP))


def quiet_third_party_noise() -> None:
    """Filter the noise out of this process's console (idempotent: the filters are added once)."""
    # Lightning's own code (lightning.pytorch.utilities._pytree) builds torch's deprecated LeafSpec.
    warnings.filterwarnings(
        "ignore",
        message=re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree\Z",
    )
    # "prepend srun": Lightning says so wherever an srun command exists, but it only applies inside
    # a SLURM allocation (sbatch, salloc), where a process not started by srun hangs or runs alone.
    if "SLURM_JOB_ID" not in os.environ:
        warnings.filterwarnings(
            "ignore",
            message=re.escape("The `srun` command is available on your system but is not used"),
            category=PossibleUserWarning,
            module=r"lightning\.fabric\.plugins\.environments\.slurm\Z",
        )
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_the_litlogger_tip not in rank_zero_log.filters:
        rank_zero_log.addFilter(_not_the_litlogger_tip)
