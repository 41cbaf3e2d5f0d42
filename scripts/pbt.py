#!/usr/bin/env python
"""Population-based training of RL agents (PBT, GPBT-PL, PB2, fixed); see
``meta/cli/pbt.py`` or ``--help``. Installed: ``metarl-pbt``."""

from meta.cli.pbt import main

if __name__ == "__main__":
    raise SystemExit(main())
