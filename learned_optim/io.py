"""Saving and loading learned optimizers (a rule and its meta-parameters).

On disk, ``save(path, rule, meta_params)`` writes a directory ::

    PATH/metadata.json   readable: format, format_version, kind, the rule's
                         constructor arguments, number and shapes of the
                         meta-parameters
    PATH/meta_params/    an orbax checkpoint of the meta-parameter tree

``metadata.json`` is written last, so an interrupted save is recognised as
incomplete. ``learned_optim.load(path) -> (rule, meta_params)`` and
``from_spec("lopt:PATH")`` read it back (``learned_optim.registry.load``
turns the saved kind into its rule class; this module knows no rule kinds);
any problem is a ``ValueError`` naming the path and what is wrong.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np

from learned_optim.layout import key_name
from learned_optim.rule import LearnedRule

FORMAT = "learned_optim.rule"
FORMAT_VERSION = 1
METADATA = "metadata.json"
PARAMS_DIR = "meta_params"


def _leaf_table(tree: Any):
    return [
        {"path": "/".join(key_name(k) for k in path), "shape": list(np.shape(x)),
         "dtype": str(np.dtype(getattr(x, "dtype", np.float32)))}
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _checkpointer():
    """A checkpointer of this process alone: a saved optimizer is a few host
    arrays, written (or read) by whichever process calls, never a collective
    save (in a multi-process run only process 0 writes it)."""
    import orbax.checkpoint as ocp

    if jax.process_count() == 1:
        return ocp.Checkpointer(ocp.StandardCheckpointHandler())
    me = jax.process_index()
    return ocp.Checkpointer(
        ocp.StandardCheckpointHandler(multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"lopt{me}")),
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"lopt{me}"))


def save(path: str, rule: LearnedRule, meta_params: Any, overwrite: bool = False) -> str:
    """Writes ``rule`` and one member's ``meta_params`` to directory ``path``;
    returns its absolute path. ``overwrite`` replaces an earlier save there."""
    if not isinstance(rule, LearnedRule) or not rule.kind:
        raise ValueError(f"save({path!r}): {rule!r} is not a learned-optimizer rule")
    path = os.path.abspath(os.fspath(path))
    template = rule.meta_params_template()
    want = _leaf_table(template)
    got = _leaf_table(meta_params)
    if [(w["path"], w["shape"]) for w in want] != [(g["path"], g["shape"]) for g in got]:
        raise ValueError(
            f"save({path!r}): meta_params do not match {type(rule).__name__} "
            f"(a population? save one member); expected {[(w['path'], w['shape']) for w in want]}"
        )
    if os.path.exists(path):
        if not overwrite:
            raise ValueError(f"save({path!r}): path exists; pass overwrite=True to replace it")
        if os.path.isdir(path) and os.listdir(path) and not os.path.exists(os.path.join(path, METADATA)):
            raise ValueError(f"save({path!r}): refusing to overwrite a directory that is not a saved optimizer")
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(path)
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(meta_params))
    _checkpointer().save(os.path.join(path, PARAMS_DIR), host)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": rule.kind,
        "config": rule.config(),
        "num_meta_params": rule.num_meta_params,
        "leaves": want,
    }
    tmp = os.path.join(path, METADATA + ".tmp")
    with open(tmp, "w") as f:
        json.dump(metadata, f, indent=2)
    os.replace(tmp, os.path.join(path, METADATA))
    return path


def read_metadata(path: str) -> dict:
    """The checked contents of ``PATH/metadata.json``."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise ValueError(f"learned optimizer {path!r}: no such directory")
    if not os.path.isdir(path):
        raise ValueError(f"learned optimizer {path!r}: not a directory (expected one written by learned_optim.save)")
    meta_file = os.path.join(path, METADATA)
    if not os.path.isfile(meta_file):
        raise ValueError(
            f"learned optimizer {path!r}: missing {METADATA} (not written by learned_optim.save, "
            f"or the save was interrupted)"
        )
    try:
        with open(meta_file) as f:
            metadata = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"learned optimizer {path!r}: {METADATA} is not readable JSON ({e})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"learned optimizer {path!r}: {METADATA} has no 'format': {FORMAT!r}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"learned optimizer {path!r}: format_version {metadata.get('format_version')!r}; "
            f"this code reads version {FORMAT_VERSION}"
        )
    for field, kind in (("kind", str), ("config", dict)):
        if not isinstance(metadata.get(field), kind):
            raise ValueError(f"learned optimizer {path!r}: {METADATA} field {field!r} missing or not a {kind.__name__}")
    return metadata


def restore_meta_params(path: str, rule: LearnedRule) -> Any:
    """The meta-parameters saved under directory ``path`` for ``rule`` (checked:
    same tree and shapes as ``rule.meta_params_template()``, all finite)."""
    path = os.path.abspath(os.fspath(path))
    params_dir = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise ValueError(f"learned optimizer {path!r}: missing checkpoint directory {PARAMS_DIR}/ (partial save?)")
    template = rule.meta_params_template()
    try:
        restored = _checkpointer().restore(params_dir, template)
    except Exception as e:  # orbax raises many types for damaged files
        raise ValueError(
            f"learned optimizer {path!r}: cannot restore {PARAMS_DIR}/ for {type(rule).__name__} "
            f"({type(e).__name__}: {str(e)[:300]})"
        ) from None
    try:
        same = jax.tree.structure(restored) == jax.tree.structure(template) and all(
            np.shape(r) == t.shape for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(template)))
    except Exception:  # noqa: BLE001
        same = False
    if not same:
        raise ValueError(f"learned optimizer {path!r}: checkpoint does not match the {type(rule).__name__} in {METADATA}")
    if not all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored)):
        raise ValueError(f"learned optimizer {path!r}: meta-parameters contain non-finite values")
    return restored
