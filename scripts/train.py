#!/usr/bin/env python
"""Train PPO on one env with one optimizer over N seeds: ``meta.cli.train`` (``metarl-train``)."""

from meta.cli.train import main

raise SystemExit(main())
