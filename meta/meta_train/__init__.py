"""Meta-training a learned optimizer: ES over whole lifetimes, ES over
pipeline units, or pipeline meta-gradients, as one run with logs,
checkpoints and a final comparison against Adam.

``plan``: the three modes' options and the validated ``Plan``; ``drivers``:
each mode's jitted step and log rows; ``loop``: the host loop (``run``);
``compare``: Adam's reference returns and the final comparison. The command
line is ``meta.cli.meta_train``."""

from meta.meta_train.loop import run
from meta.meta_train.plan import (MODES, LifetimeESOptions, MetaGradOptions, Plan, RunOptions, UnitESOptions,
                                  build, mode_of, mode_options, plan_document)

__all__ = ["MODES", "LifetimeESOptions", "MetaGradOptions", "Plan", "RunOptions", "UnitESOptions", "build",
           "mode_of", "mode_options", "plan_document", "run"]
