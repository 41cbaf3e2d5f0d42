#!/usr/bin/env python
"""Play the agents a train run saved: ``meta.cli.eval`` (``metarl-eval``)."""

from meta.cli.eval import main

raise SystemExit(main())
