"""Overlay the learning curves of several ``metarl-train`` (``scripts/train.py``) runs.

    python scripts/plot_runs.py --runs "OPEN=runs/open,Adam=runs/adam" \\
        --title "Breakout-MinAtar, 1e7 steps" --out docs/fidelity_breakout.png

Each run directory must hold the ``curve.csv`` that train.py writes (one
column per seed); the plot shows the mean over seeds with a min-max band, and
a line per run with its final return (``results.json``) is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from meta.report import plot_curves, read_curve_csv


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, help="comma-separated LABEL=DIR pairs (train.py output directories)")
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True, help="PNG path")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        runs = []
        for item in filter(None, (t.strip() for t in a.runs.split(","))):
            label, sep, path = item.partition("=")
            if not sep or not label or not path:
                raise ValueError(f"--runs: expected LABEL=DIR, got {item!r}")
            csv_path = os.path.join(path, "curve.csv")
            if not os.path.exists(csv_path):
                raise ValueError(f"--runs: {csv_path} not found (run scripts/train.py --out {path} first)")
            runs.append((label, path, *read_curve_csv(csv_path)))
        if not runs:
            raise ValueError("--runs: give at least one LABEL=DIR")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plot_curves(a.out, {label: (x, curves) for label, _, x, curves in runs}, title=a.title)
    for label, path, _, _ in runs:
        res = os.path.join(path, "results.json")
        if os.path.exists(res):
            with open(res) as f:
                r = json.load(f)
            per = r.get("final_return_per_seed") or r.get("final_return")
            print(f"{label}: final return {r.get('final_return_mean')} per seed {per}")
    print(f"wrote {a.out}")
    return 0
