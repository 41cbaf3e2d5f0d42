"""``python -m envs``: every env name ``envs.make`` accepts, grouped by family,
and the registered gymnax envs it does not accept, each with its reason.

Fast: gymnax envs are built (nothing is reset, stepped or compiled) and no
data set is downloaded.
"""

from __future__ import annotations

import sys

import envs
from envs import gymnax_env


def listing() -> str:
    """The text ``python -m envs`` prints."""
    registered = gymnax_env.registered()
    reasons = {n: gymnax_env.problem(n, download=False) for n in registered}
    works = [n for n in registered if reasons[n] is None]
    suites = {m: s for s, members in envs.SUITES.items() for m in members}
    lines = [f"gymnax ({len(works)} of the {len(registered)} envs gymnax registers):"]
    lines += [f"  {n}" + (f"  [suite {suites[n]}]" if n in suites else "") for n in works]
    broken = [n for n in registered if reasons[n] is not None]
    if broken:
        lines.append(f"gymnax, not usable here ({len(broken)}):")
        lines += [f"  {n}: {reasons[n]}" for n in broken]
    lines.append(f"brax ({len(envs.BRAX_ENVS)}, suite brax):")
    lines += [f"  brax/{n}" for n in envs.BRAX_ENVS]
    lines.append(f"gridworld ({len(envs.GRIDWORLD_ENVS)}, suite gridworlds):")
    lines += [f"  {n}" for n in envs.GRIDWORLD_ENVS]
    lines.append("suites: " + "; ".join(f"{s} = {', '.join(m)}" for s, m in envs.SUITES.items()
                                         if s not in ("brax", "gridworlds")))
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv if argv is not None else sys.argv[1:]:
        print("usage: python -m envs  (lists the env names envs.make accepts)", file=sys.stderr)
        return 2
    print(listing())
    return 0


if __name__ == "__main__":
    sys.exit(main())
