#!/usr/bin/env python
"""Overlay the learning curves of several train runs: ``meta.cli.plot_runs``."""

from meta.cli.plot_runs import main

raise SystemExit(main())
