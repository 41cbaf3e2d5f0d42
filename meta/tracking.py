"""Weights & Biases logging (the optional ``[wandb]`` extra): ``--wandb PROJECT``.

Every run with an output directory writes its metrics as rows to
``OUT/log.jsonl`` (``meta.report.write_log_rows``: one row per update of
``metarl-train``, per round of ``metarl-pbt``, per outer step of
``metarl-meta-train``); a ``WandbSink`` handed to that writer sends each new
row to a wandb run as one ``wandb.log`` step, so the wandb history holds the
same rows as the JSONL file (row ``i`` is wandb step ``i``; a resumed run
opens a new wandb run that receives the whole history again).

``WANDB_MODE=offline`` writes the run under ``OUT/wandb/`` without network;
``wandb sync`` uploads it later.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Dict, Optional, Sequence

INSTALL_HINT = "pip install -e .[wandb]"


def require_wandb():
    """The ``wandb`` module; not installed -> a one-line ``ValueError`` naming
    the extra (raised by the CLIs before anything compiles)."""
    try:
        import wandb
    except ImportError:
        raise ValueError(f"--wandb needs the wandb package, which is not installed: {INSTALL_HINT} "
                         "(or pip install wandb)") from None
    return wandb


def wandb_row(row: Dict[str, Any]) -> Dict[str, Any]:
    """A ``log.jsonl`` row as wandb logs it: numbers and strings as they are,
    a list of numbers as one value per entry (``KEY/0``, ``KEY/1``, ...; e.g.
    the mean return per env), None (no value yet) left out."""
    out = {}
    for k, v in row.items():
        if isinstance(v, (list, tuple)):
            out.update({f"{k}/{i}": x for i, x in enumerate(v) if isinstance(x, numbers.Number)})
        elif isinstance(v, (numbers.Number, str)):
            out[k] = v
    return out


class WandbSink:
    """Sends the rows of a run's ``log.jsonl`` to one wandb run. ``log_rows``
    takes all rows so far (as ``write_log_rows`` does) and logs those it has
    not sent yet, in order; ``finish`` closes the run."""

    def __init__(self, run):
        self.run = run
        self.sent = 0

    def log_rows(self, rows: Sequence[Dict[str, Any]]) -> None:
        for row in rows[self.sent:]:
            self.run.log(wandb_row(row))
        self.sent = max(self.sent, len(rows))

    def finish(self) -> None:
        self.run.finish()


def open_sink(project: Optional[str], out: str, command: str, config: Dict[str, Any]) -> Optional[WandbSink]:
    """A wandb run in ``project`` (None: no sink) named after ``out``, its
    files under ``out/wandb``, with ``config`` (the parsed flags) as its
    config. Only process 0 of a multi-process run logs. wandb missing or
    failing to start -> a one-line ``ValueError``."""
    if not project:
        return None
    wandb = require_wandb()
    from meta import distributed

    if not distributed.is_main():
        return None
    os.makedirs(out, exist_ok=True)
    clean = {k: v for k, v in config.items() if v is None or isinstance(v, (numbers.Number, str, bool, list))}
    try:
        run = wandb.init(project=project, dir=out, name=os.path.basename(os.path.abspath(out)),
                         job_type=command, config={"command": command, **clean},
                         # console capture would wrap stdout; our JSON/progress lines stay plain
                         settings=wandb.Settings(console="off"))
    except Exception as e:  # no API key without a terminal, a bad project name, ...
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"--wandb {project}: wandb could not start a run ({msg}); "
                         "without network set WANDB_MODE=offline") from None
    return WandbSink(run)

