#!/usr/bin/env python
"""Meta-train a learned optimizer (ES or meta-gradients): ``meta.cli.meta_train`` (``metarl-meta-train``)."""

from meta.cli.meta_train import main

raise SystemExit(main())
