#!/usr/bin/env python
"""Pipeline meta-training, an alias of ``meta_train.py --method metagrad``: ``meta.cli.meta_train_pipeline``."""

from meta.cli.meta_train_pipeline import main

raise SystemExit(main())
