"""Pipeline meta-training (Optim4RL style): an alias of ``meta_train``.

    python scripts/meta_train_pipeline.py --rule optim4rl --envs Catch-bsuite \\
        --pipeline-units 4 --reset-interval 40 --meta-steps 800 --seeds 4
    python scripts/meta_train_pipeline.py ... --no-pipeline       # ablation: all units reset together
    python scripts/meta_train_pipeline.py --method es ...         # ES with fitness from the units

It runs ``meta_train.py --method metagrad --pipeline-units 4 --out
runs/meta_train_pipeline`` followed by the given flags (so they win), with the
flag names this script has always had translated: ``--lr`` is the agent's
learning rate (``--agent-lr`` there) and ``--seeds`` the seeds of the final
comparison (``--final-seeds``). See ``meta_train.py --help`` for the rest.
"""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence

from meta.cli import meta_train

RENAMED = {"--lr": "--agent-lr", "--seeds": "--final-seeds"}


def translate(argv: Sequence[str]) -> List[str]:
    """This alias's flags -> ``meta_train``'s."""
    out = []
    for a in argv:
        flag, eq, value = a.partition("=")
        out.append(RENAMED[flag] + eq + value if flag in RENAMED else a)
    return ["--method", "metagrad", "--pipeline-units", "4", "--out", "runs/meta_train_pipeline"] + out


def main(argv: Optional[Sequence[str]] = None) -> int:
    return meta_train.main(translate(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
