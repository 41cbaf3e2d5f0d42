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
    return jax.tree.map(lambda x, t: jax.random.wrap_key_data(x, impl=_key_impl(t)) if _is_key(t) else x, raw, like)


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


def read_document(directory: str, step: Optional[int] = None) -> Tuple[int, Dict[str, Any]]:
    """``(step, document)`` of checkpoint ``step`` (None: the latest) in
    ``directory``, without reading the arrays. ``CheckpointError`` when there
    is none or it cannot be read."""
    import orbax.checkpoint as ocp

    step = latest_step(directory) if step is None else step
    if step is None:
        raise CheckpointError(f"--resume: no checkpoint found in {directory!r}")
    mngr = _manager(directory)
    try:
        return step, mngr.restore(step, args=ocp.args.Composite(document=ocp.args.JsonRestore()))["document"]
    except Exception as e:  # corrupted or incompatible files
        raise CheckpointError(f"checkpoint step {step} in {directory!r} could not be read: {e}") from e
    finally:
        mngr.close()


def check_config(directory: str, document: Dict[str, Any], config: Dict[str, Any]) -> None:
    """``CheckpointError`` naming the settings that differ when ``document["config"]``
    (read from ``directory``) is not ``config``."""
    stored = _canonical(document.get("config"))
    config = _canonical(config)
    if stored != config:
        diff = _differences(stored or {}, config or {})
        raise CheckpointError(
            f"checkpoint in {directory!r} was written with a different config (differs in: "
            f"{', '.join(diff)}); use the same settings or a fresh --out directory"
        )


def restore(directory: str, target: Any, config: Dict[str, Any],
            step: Optional[int] = None) -> Tuple[int, Any, Dict[str, Any]]:
    """``(step, state, document)`` of checkpoint ``step`` (None: the latest) in ``directory``.

    ``target`` is a pytree with the expected structure, shapes and dtypes
    (arrays or ``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape``).
    Raises ``CheckpointError`` when there is none, or when its stored
    ``document["config"]`` differs from ``config``.
    """
    import orbax.checkpoint as ocp

    step, document = read_document(directory, step)
    check_config(directory, document, config)
    mngr = _manager(directory)
    try:
        abstract = jax.tree.map(_abstract_leaf, target)
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        state = data_to_keys(state, target)
    except Exception as e:  # corrupted or incompatible files
        raise CheckpointError(f"checkpoint step {step} in {directory!r} could not be read: {e}") from e
    finally:
        mngr.close()
    return step, state, document


def _abstract_leaf(x) -> jax.ShapeDtypeStruct:
    """The stored shape and dtype of a target leaf (a typed key: its raw key data)."""
    if _is_key(x):
        return jax.eval_shape(jax.random.key_data, x)
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)


def _key_impl(key):
    """The PRNG implementation of a typed key, concrete or abstract."""
    if not isinstance(key, jax.ShapeDtypeStruct):
        return jax.random.key_impl(key)
    impl = []
    jax.eval_shape(lambda k: impl.append(jax.random.key_impl(k)), key)
    return impl[0]


def _differences(stored: Dict[str, Any], config: Dict[str, Any], prefix: str = "") -> list:
    """``["lr (checkpoint 0.1, now 0.2)", "ppo_config.num_envs (...)"]``: the
    (nested) keys whose values differ."""
    out = []
    for k in sorted(set(stored) | set(config)):
        a, b = stored.get(k), config.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, f"{prefix}{k}."))
        else:
            out.append(f"{prefix}{k} (checkpoint {_short(a)}, now {_short(b)})")
    return out


def _short(v, width: int = 40) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def _canonical(d):
    return json.loads(json.dumps(d, sort_keys=True, default=str)) if d is not None else None
