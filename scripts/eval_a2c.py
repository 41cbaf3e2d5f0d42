#!/usr/bin/env python
"""Train fresh A2C agents with several optimizers on several envs: ``meta.cli.eval_a2c`` (``metarl-eval-a2c``)."""

from meta.cli.eval_a2c import main

raise SystemExit(main())
