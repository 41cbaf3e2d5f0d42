#!/usr/bin/env python
"""What vmapping a population of learned optimizers costs in throughput: ``meta.cli.es_throughput``."""

from meta.cli.es_throughput import main

raise SystemExit(main())
