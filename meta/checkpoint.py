"""Checkpoints for long runs: orbax, written atomically, resumed bit for bit.

A checkpoint holds a pytree of arrays (algorithm state, keys as raw key data)
and a JSON document (config, logs, generation). ``orbax``'s
``CheckpointManager`` writes each step to a temporary directory and renames it
when complete, so an interrupted save never leaves a partial checkpoint
behind. ``restore`` checks that the stored config equals the current one.
Typed PRNG keys anywhere in the state are stored as their raw key data and
come back as typed keys of the target's implementation.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np


class CheckpointError(ValueError):
    pass


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(tree):
    """``tree`` with every typed PRNG key replaced by its raw ``uint32`` key data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def data_to_keys(raw, like):
    """Inverse of ``keys_to_data``: leaves of ``raw`` where ``like`` holds a typed
    key become typed keys of ``like``'s implementation; the others are kept."""
    return jax.tree.map(lambda x, t: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
                        raw, like)


def _manager(directory: str, max_to_keep: int = 2):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )


def save(directory: str, step: int, state: Any, document: Dict[str, Any]) -> None:
    """Saves ``state`` (pytree of arrays) and ``document`` (JSON-able) as ``step``."""
    import orbax.checkpoint as ocp

    mngr = _manager(directory)
    state = jax.device_get(keys_to_data(state))
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), document=ocp.args.JsonSave(document)),
        force=True,
    )
    mngr.wait_until_finished()
    mngr.close()


def latest_step(directory: str) -> Optional[int]:
    if not os.path.isdir(directory):
        return None
    mngr = _manager(directory)
    step = mngr.latest_step()
    mngr.close()
    return step


def restore(directory: str, target: Any, config: Dict[str, Any]) -> Tuple[int, Any, Dict[str, Any]]:
    """``(step, state, document)`` of the latest checkpoint in ``directory``.

    ``target`` is a pytree with the expected structure, shapes and dtypes.
    Raises ``CheckpointError`` when there is none, or when its stored
    ``document["config"]`` differs from ``config``.
    """
    import orbax.checkpoint as ocp

    step = latest_step(directory)
    if step is None:
        raise CheckpointError(f"--resume: no checkpoint found in {directory!r}")
    mngr = _manager(directory)
    try:
        document = mngr.restore(step, args=ocp.args.Composite(document=ocp.args.JsonRestore()))["document"]
        stored = document.get("config")
        if _canonical(stored) != _canonical(config):
            diff = sorted(k for k in set(stored or {}) | set(config) if (stored or {}).get(k) != config.get(k))
            raise CheckpointError(
                f"checkpoint in {directory!r} was written with a different config (differs in: "
                f"{', '.join(diff)}); use the same settings or a fresh --out directory"
            )
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                                keys_to_data(target))
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        state = data_to_keys(state, target)
    except CheckpointError:
        raise
    except Exception as e:  # corrupted or incompatible files
        raise CheckpointError(f"checkpoint step {step} in {directory!r} could not be read: {e}") from e
    finally:
        mngr.close()
    return step, state, document


def _canonical(d):
    return json.loads(json.dumps(d, sort_keys=True, default=str)) if d is not None else None
