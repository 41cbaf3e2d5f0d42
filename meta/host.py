"""Host-side helpers of the outer loops' drivers: chunking a long run for
progress output, ETA text, peak memory and a one-line device description.
Nothing here runs inside ``jit``."""

from __future__ import annotations

import resource
import sys
from typing import Dict, List, Optional

import jax
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


def fmt_eta(seconds: Optional[float]) -> str:
    """``3725`` -> ``"1:02:05"``, ``65`` -> ``"1:05"``; None or non-finite -> ``"?"``."""
    if seconds is None or not np.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


def peak_memory_mb() -> Dict[str, float]:
    """Peak host RSS of this process, and peak device memory where the
    backend reports it (GPU/TPU), in MiB."""
    out: Dict[str, float] = {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["host_peak_rss_mb"] = rss / 1024.0 if sys.platform != "darwin" else rss / 2**20
    try:
        memory = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in memory:
            out["device_peak_mb"] = memory["peak_bytes_in_use"] / 2**20
    except Exception:  # pragma: no cover - backend without memory stats
        pass
    return out


def device_description() -> str:
    """``"cpu:cpu x1"``, ``"gpu:NVIDIA H100 x8"``: platform, kind and device count."""
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}"
