"""Population-based training in one jitted program: PBT, GPBT-PL, PB2 and
mixed-optimizer populations.

One round = ``interval`` updates of every member (vmapped) + selection, pure
and jitted; a thin host loop drives rounds. Modules, bottom to top:

* ``space``: tuned hyperparameters (``HParamSpace``, ``PPO_SPACE``,
  ``TD3_SPACE``; ``"lr"`` is the optimizer's injected learning rate),
  unit/log coordinates, prior sampling, reading and writing them in states.
* ``exploit``: fitness and who copies from whom (``truncation_select``,
  ``ttest_select``, ``tournament_select``); bad members always replaced.
* ``explore``: ``perturb``, ``resample`` and ``resample_or_perturb`` (Ray's mix).
* ``gpbt``: GPBT-PL pairwise learning (Bai & Cheng 2024).
* ``pb2``: PB2's time-varying GP bandit (Parker-Holder et al. 2020).
* ``select``: the algorithms, exploit and explore rules by name.
* ``population``: optimizer groups (``"adam:6,kfac:2"``) and the member
  agents of each agent kind (PPO, TD3).
* ``program``: ``PBTConfig``, ``PBTState``, ``make_pbt`` (the pure round),
  ``population_shardings``.
* ``run``: ``run_pbt``, the host loop (progress, histories, checkpoints).

Plots of a run: ``meta.report.plot_history``; the command line:
``meta.cli.pbt``.
"""

from meta.pbt.exploit import (member_fitness, tournament_select, truncation_count, truncation_select,
                              ttest_select, welch_t_pvalue)
from meta.pbt.explore import perturb, resample, resample_or_perturb
from meta.pbt.gpbt import gpbt_pairs, gpbt_pl_update
from meta.pbt.pb2 import PB2Data, pb2_empty, pb2_propose, pb2_record, tv_kernel
from meta.pbt.population import AGENT_KINDS, Group, MemberAgent, make_member_agents, parse_groups, td3_available
from meta.pbt.program import PBT, PBTConfig, PBTState, make_pbt, population_shardings, push_episodes
from meta.pbt.run import run_pbt
from meta.pbt.select import ALGORITHMS, ALGOS, EXPLOIT_RULES, EXPLOITS, EXPLORE_RULES, EXPLORES
from meta.pbt.space import (LEARNING_RATE, PPO_SPACE, SCALES, TD3_SPACE, HParamSpace, from_unit, member_matrix,
                            sample_prior, to_unit, with_member_matrix)

__all__ = [
    "AGENT_KINDS", "ALGORITHMS", "ALGOS", "EXPLOITS", "EXPLOIT_RULES", "EXPLORES", "EXPLORE_RULES", "Group",
    "HParamSpace", "MemberAgent", "PB2Data", "PBT", "PBTConfig", "PBTState", "PPO_SPACE", "SCALES", "TD3_SPACE",
    "LEARNING_RATE", "from_unit", "gpbt_pairs", "gpbt_pl_update", "make_member_agents", "make_pbt", "member_matrix",
    "member_fitness", "parse_groups", "pb2_empty", "pb2_propose", "pb2_record", "perturb", "population_shardings",
    "push_episodes", "resample", "resample_or_perturb", "run_pbt", "sample_prior", "td3_available", "to_unit", "tournament_select",
    "truncation_count", "truncation_select", "ttest_select", "tv_kernel", "welch_t_pvalue", "with_member_matrix",
]
