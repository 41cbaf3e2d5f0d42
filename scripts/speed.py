#!/usr/bin/env python
"""What an optimizer costs, side by side: ``meta.cli.speed`` (``metarl-speed``)."""

from meta.cli.speed import main

raise SystemExit(main())
