"""Small reporting helpers shared by the scripts: JSON/CSV writers, plots,
peak memory, chunking of long runs for progress output."""

from __future__ import annotations

import csv
import json
import os
import resource
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np


def chunk_sizes(total: int, target_chunks: int = 20) -> List[int]:
    """Splits ``total`` iterations into chunks for progress output, using at
    most two distinct sizes (each distinct size compiles once)."""
    if total <= 0:
        return []
    n = max(1, min(target_chunks, total))
    size = total // n
    sizes = [size] * (total // size)
    if total % size:
        sizes.append(total % size)
    return sizes


def peak_memory_mb() -> Dict[str, float]:
    """Peak host RSS of this process, and peak device memory where the
    backend reports it (GPU/TPU), in MiB."""
    out: Dict[str, float] = {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["host_peak_rss_mb"] = rss / 1024.0 if sys.platform != "darwin" else rss / 2**20
    try:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    except Exception:  # pragma: no cover - backend without memory stats
        pass
    return out


def device_description() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}"


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def write_curve_csv(path: str, steps: Sequence[int], curves: np.ndarray, prefix: str = "seed") -> None:
    """``curves [S, T]`` -> CSV with columns step, seed0..seedS-1, mean, std."""
    curves = np.asarray(curves, np.float64)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["env_steps"] + [f"{prefix}{i}" for i in range(curves.shape[0])] + ["mean", "std"])
        for t, step in enumerate(steps):
            col = curves[:, t]
            w.writerow([int(step)] + [f"{v:.6g}" for v in col] + [f"{np.nanmean(col):.6g}", f"{np.nanstd(col):.6g}"])


def plot_curves(
    path: str,
    lines: Dict[str, tuple],
    title: str = "",
    xlabel: str = "env steps",
    ylabel: str = "episode return",
) -> None:
    """``lines[label] = (x [T], curves [S, T])``: mean with a shaded min-max
    band over seeds (interquartile band when there are 5 or more)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, (x, curves) in lines.items():
        curves = np.atleast_2d(np.asarray(curves, np.float64))
        mean = np.nanmean(curves, axis=0)
        if curves.shape[0] >= 5:
            lo, hi = np.nanpercentile(curves, 25, axis=0), np.nanpercentile(curves, 75, axis=0)
        else:
            lo, hi = np.nanmin(curves, axis=0), np.nanmax(curves, axis=0)
        (line,) = ax.plot(x, mean, label=f"{label} (n={curves.shape[0]})")
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt_eta(seconds: Optional[float]) -> str:
    if seconds is None or not np.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"
