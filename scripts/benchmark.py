#!/usr/bin/env python
"""Benchmark optimizers x environments with PPO: ``meta.cli.benchmark`` (``metarl-benchmark``)."""

from meta.cli.benchmark import main

raise SystemExit(main())
