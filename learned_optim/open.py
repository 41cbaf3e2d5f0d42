"""OPEN (Goldie et al., NeurIPS 2024, arXiv 2407.07082) as an optax transform.

Per parameter element, a GRU followed by an MLP maps 19 input features to
three outputs ``o``; the step is ::

    step = o0 * step_mult * exp(o1 * exp_mult)  +  [actor only] o2 * step_mult * N(0, 1)
    step = step - mean(step over every element of every parameter)
    param <- param - step            (the optax update is -step)

Features (``open_features``), in this order, for a tensor ``p`` with gradient
``g`` and momenta ``m_b = b m_b + (1 - b) g`` (zero-initialised, no bias
correction) for ``b`` in ``BETAS``:

    0      p
    1-6    sign(m_b)
    7-12   log(|m_b| + 1e-13)
    13     sign(g)
    14     log(|g| + 1e-13)
           -- features 0-14 normalised per tensor and per feature by
              x / sqrt(1e-5 + mean(x**2)) over the tensor's elements --
    15     training proportion   (extra arg ``train_fraction``; neutral 0.0)
    16     layer proportion      (from the params tree, see ``base.LeafInfo``;
                                  ``log_std`` counts as the actor's last entry,
                                  as in the published code; 0.0 without layers)
    17     batch proportion      (extra arg ``batch_fraction``; neutral 0.0)
    18     dormancy              (from ``layer_stats[part][layer].outputs``;
                                  neutral 1.0 for ``log_std`` -- which the
                                  published code also gets -- and when no
                                  statistics are passed)

The noise goes to leaves under the params tree's ``"actor"`` key only. The
GRU hidden state (one ``[H]`` vector per parameter element, zeros at init) is
carried in the optimizer state across all updates.

Published weights: ``load_open_weights(path)`` / ``from_spec("open:PATH.npy")``
read the flat float32 vector of 1211 (GRU 8, MLP 16) or 3571 (GRU 16, MLP 32)
floats, in JAX tree order over ``{"gru_params": GRUCell vars, "params":
Sequential MLP vars}``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_optim import base

BETAS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
NUM_FEATURES = 19
NUM_NORMALISED = 15
LOG_EPS = 1e-13


class OpenState(NamedTuple):
    """momenta: like params, leaves ``[..., 6]`` float32 (one per beta).
    carry:   like params, leaves ``[..., gru_features]`` float32 (GRU state).
    count:   int32 scalar, updates done."""

    momenta: Any
    carry: Any
    count: jax.Array

    required_stats = frozenset({"outputs"})  # dormancy needs post-activation outputs


def open_features(p, g, momenta, train_fraction, layer_prop, batch_fraction, dorm) -> jax.Array:
    """OPEN's 19 input features for one tensor.

    p, g: ``[*S]``; momenta: ``[*S, 6]`` (already updated with ``g``);
    train_fraction, layer_prop, batch_fraction: scalars; dorm: ``[*S]``.
    Returns ``[*S, 19]`` float32.
    """
    p = jnp.asarray(p, jnp.float32)
    g = jnp.asarray(g, jnp.float32)
    shape = p.shape
    normalised = jnp.concatenate(
        [
            p[..., None],
            jnp.sign(momenta),
            jnp.log(jnp.abs(momenta) + LOG_EPS),
            jnp.sign(g)[..., None],
            jnp.log(jnp.abs(g) + LOG_EPS)[..., None],
        ],
        axis=-1,
    )
    normalised = base.second_moment_normalise(normalised)
    const = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape)[..., None]  # noqa: E731
    return jnp.concatenate(
        [normalised, const(train_fraction), const(layer_prop), const(batch_fraction),
         jnp.broadcast_to(dorm, shape).astype(jnp.float32)[..., None]],
        axis=-1,
    )


def _mlp(hidden_size: int) -> nn.Module:
    # Sequential so the parameter names (layers_0, 1, 3, 4, 6) match the published vectors.
    return nn.Sequential([
        nn.Dense(hidden_size), nn.LayerNorm(), nn.relu,
        nn.Dense(hidden_size), nn.LayerNorm(), nn.relu,
        nn.Dense(3),
    ])


@dataclasses.dataclass(frozen=True)
class OpenRule(base.LearnedRule):
    """OPEN's architecture and step scales.

    gru_features: GRU hidden size (8 published; 16 for the larger variant).
    hidden_size:  width of the two MLP layers (16; 32 larger).
    step_mult, exp_mult: the 0.001 scales of the step formula.
    actor_noise:  add the learned stochastic term to actor parameters.
    """

    kind: ClassVar[str] = "open"

    gru_features: int = 8
    hidden_size: int = 16
    step_mult: float = 0.001
    exp_mult: float = 0.001
    actor_noise: bool = True

    def __post_init__(self):
        base.check_positive_int("OpenRule", "gru_features", self.gru_features)
        base.check_positive_int("OpenRule", "hidden_size", self.hidden_size)

    def init_meta_params(self, key: jax.Array) -> Any:
        """``{"gru_params": GRUCell vars, "params": MLP vars}`` (flax default inits)."""
        k_mlp, k_gru = jax.random.split(key)
        gru = nn.GRUCell(features=self.gru_features)
        carry = jnp.zeros((self.gru_features,), jnp.float32)
        return {
            "gru_params": gru.init(k_gru, carry, jnp.zeros((NUM_FEATURES,), jnp.float32)),
            "params": _mlp(self.hidden_size).init(k_mlp, jnp.zeros((self.gru_features,), jnp.float32)),
        }

    def make_optimizer(self, meta_params: Any) -> optax.GradientTransformationExtraArgs:
        return scale_by_open(meta_params, self)


def scale_by_open(meta_params: Any, rule: OpenRule = OpenRule()) -> optax.GradientTransformationExtraArgs:
    """OPEN's update (the optax update is ``-step``); needs ``params``."""
    gru = nn.GRUCell(features=rule.gru_features)
    mlp = _mlp(rule.hidden_size)

    def init_fn(params):
        zeros = lambda k: jax.tree.map(lambda p: jnp.zeros(jnp.shape(p) + (k,), jnp.float32), params)  # noqa: E731
        return OpenState(momenta=zeros(len(BETAS)), carry=zeros(rule.gru_features),
                         count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("OPEN needs the current params: call tx.update(grads, state, params, ...)")
        ctx = base.read_context(extra, state.count)
        g_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = treedef.flatten_up_to(params)
        infos = base.leaf_infos(jax.tree.unflatten(treedef, p_leaves))
        layout = base.flat_layout(infos, [jnp.shape(g) for g in g_leaves])

        # All elements of all tensors at once ([N, ...]); ``open_features`` is the
        # per-tensor statement of the same computation (the tests compare them).
        g = base.flatten_elements(g_leaves)
        m = base.update_momenta(base.flatten_elements(treedef.flatten_up_to(state.momenta), (len(BETAS),)), g, BETAS)
        normalised = base.flat_normalise(jnp.concatenate(
            [base.flatten_elements(p_leaves)[:, None], jnp.sign(m), jnp.log(jnp.abs(m) + LOG_EPS),
             jnp.sign(g)[:, None], jnp.log(jnp.abs(g) + LOG_EPS)[:, None]], axis=-1), layout)
        n = g.shape[0]
        x = jnp.concatenate([
            normalised,
            jnp.broadcast_to(ctx.train_fraction, (n, 1)),
            jnp.asarray(layout.layer_prop)[:, None],
            jnp.broadcast_to(ctx.batch_fraction, (n, 1)),
            base.flat_dormancy(ctx.layer_stats, infos, layout)[:, None],
        ], axis=-1)                                                   # [N, 19]
        carry = base.flatten_elements(treedef.flatten_up_to(state.carry), (rule.gru_features,))
        new_carry, h = gru.apply(meta_params["gru_params"], carry, x)
        o = mlp.apply(meta_params["params"], h)                       # [N, 3]
        step = o[:, 0] * rule.step_mult * jnp.exp(o[:, 1] * rule.exp_mult)
        if rule.actor_noise and layout.is_actor.any():
            eps = jax.random.normal(ctx.key, step.shape, jnp.float32)
            step = step + jnp.asarray(layout.is_actor) * o[:, 2] * rule.step_mult * eps
        step = step - jnp.mean(step)

        split = lambda flat: jax.tree.unflatten(treedef, base.split_elements(flat, layout.shapes))  # noqa: E731
        out = [(-s).astype(jnp.result_type(u)) for s, u in zip(base.split_elements(step, layout.shapes), g_leaves)]
        new_state = OpenState(momenta=split(m), carry=split(new_carry), count=state.count + 1)
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# Published weights ------------------------------------------------------------------

OPEN_SMALL = OpenRule()
OPEN_LARGE = OpenRule(gru_features=16, hidden_size=32)


def load_open_weights(path: str) -> Tuple[OpenRule, Any]:
    """(rule, meta_params) from a published OPEN ``.npy`` flat vector; the
    size (1211 or 3571 floats) picks the small or large architecture."""
    if not os.path.isfile(path):
        raise ValueError(f"OPEN weights {path!r}: no such file")
    try:
        flat = np.load(path, allow_pickle=False)
    except Exception as e:  # corrupt header, pickled object array, ...
        raise ValueError(f"OPEN weights {path!r}: not a readable .npy array ({e})") from None
    if flat.ndim != 1 or not np.issubdtype(flat.dtype, np.floating):
        raise ValueError(
            f"OPEN weights {path!r}: expected a 1-D float vector, got dtype {flat.dtype} shape {flat.shape}"
        )
    sizes = {OPEN_SMALL.num_meta_params: OPEN_SMALL, OPEN_LARGE.num_meta_params: OPEN_LARGE}
    if flat.shape[0] not in sizes:
        raise ValueError(
            f"OPEN weights {path!r}: {flat.shape[0]} floats; expected "
            + " or ".join(f"{n} ({'small' if r is OPEN_SMALL else 'large'})" for n, r in sizes.items())
        )
    if not np.all(np.isfinite(flat)):
        raise ValueError(f"OPEN weights {path!r}: contains non-finite values")
    rule = sizes[flat.shape[0]]
    return rule, rule.unflatten(flat.astype(np.float32))


# Spec builders (registered in learned_optim/__init__.py) ---------------------------


def _fresh(rule: OpenRule, name: str, arg: str):
    from learned_optim.spec import parse_kwargs

    kw = parse_kwargs(arg, ("seed",), f"{name}:{arg}")
    seed = int(kw.get("seed", 0))
    return rule.make_optimizer(rule.init_meta_params(jax.random.key(seed)))


def _looks_like_path(arg: str) -> bool:
    a = arg.strip()
    return bool(a) and ("=" not in a or a.endswith(".npy") or os.sep in a)


def from_spec_arg(arg: str) -> optax.GradientTransformationExtraArgs:
    """``open:PATH.npy`` (published weights) or ``open[:seed=N]`` (fresh, small)."""
    if _looks_like_path(arg):
        rule, meta_params = load_open_weights(arg.strip())
        return rule.make_optimizer(meta_params)
    return _fresh(OPEN_SMALL, "open", arg)


def large_from_spec_arg(arg: str) -> optax.GradientTransformationExtraArgs:
    """``open_large[:seed=N]``: fresh larger OPEN (GRU 16, MLP 32; 3571 floats)."""
    return _fresh(OPEN_LARGE, "open_large", arg)
