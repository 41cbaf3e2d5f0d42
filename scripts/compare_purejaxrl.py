#!/usr/bin/env python
"""Throughput of our PPO beside purejaxrl's ``ppo.py``: ``meta.cli.compare_purejaxrl``."""

from meta.cli.compare_purejaxrl import main

raise SystemExit(main())
