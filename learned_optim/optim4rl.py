"""Optim4RL (Lan et al., RLC 2024, arXiv 2302.01470) as an optax transform.

Per parameter element, the gradient is clipped to ``[-grad_clip, grad_clip]``
and two GRU branches (hidden ``H``, tanh, zero initial state) each followed
by a ``Dense(1)`` give pseudo moments ::

    m = sign(g) * exp(Dense_m(GRU_m(g)))
    v = exp(Dense_v(GRU_v(g**2)))
    update = -learning_rate * m / sqrt(v + eps)

``scale_by_optim4rl`` yields ``m / sqrt(v + eps)``; ``Optim4RLRule.make_optimizer``
chains it with an injected ``scale_by_learning_rate`` so the learning rate
sits in ``state.hyperparams["learning_rate"]`` where agents and PBT set it
(``agents.core.with_learning_rate``; our agents' ``learning_rate=`` overrides
the rule's default there).
With H = 8: two branches of 3*(8*8) + 8 + 3*(1*8 + 8) + (8 + 1) = 257 floats,
514 meta-parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from learned_optim.cells import gru_cell, gru_weights
from learned_optim.layout import check_flat_state, flat_size, flatten_elements, split_elements
from learned_optim.rule import LearnedRule, check_positive_int
from learned_optim.spec import parse_kwargs


class Optim4RLState(NamedTuple):
    """carry_m, carry_v: ``[H, N]`` float32, the two GRU states, flat and
    feature-major over the ``N`` parameter elements in ``jax.tree.leaves``
    order (see ``learned_optim.cells`` for why)."""

    carry_m: jax.Array
    carry_v: jax.Array


def scale_by_optim4rl(meta_params: Any, hidden_size: int = 8, grad_clip: float = 1.0,
                      eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
    """Optim4RL's direction ``m / sqrt(v + eps)`` (learning rate not applied).

    meta_params: ``{"m_gru", "m_out", "v_gru", "v_out"}`` flax variable dicts
    (see ``Optim4RLRule.init_meta_params``). Extra arguments are ignored.
    """
    gru_m, gru_v = gru_weights(meta_params["m_gru"]), gru_weights(meta_params["v_gru"])
    head_m, head_v = meta_params["m_out"]["params"], meta_params["v_out"]["params"]

    def init_fn(params):
        zeros = jnp.zeros((hidden_size, flat_size(params)), jnp.float32)
        return Optim4RLState(carry_m=zeros, carry_v=zeros)

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        g_leaves, treedef = jax.tree.flatten(updates)
        shapes = [jnp.shape(g) for g in g_leaves]
        g = flatten_elements(g_leaves)                                             # [N]
        check_flat_state("Optim4RL", state.carry_m, g.shape[0])
        g = jnp.clip(g, -grad_clip, grad_clip)[None]                                # [1, N]
        cm = gru_cell(gru_m, state.carry_m, g)
        cv = gru_cell(gru_v, state.carry_v, jnp.square(g))
        log_m = jnp.dot(head_m["kernel"].T, cm)[0] + head_m["bias"][0]
        log_v = jnp.dot(head_v["kernel"].T, cv)[0] + head_v["bias"][0]
        direction = jnp.sign(g[0]) * jnp.exp(log_m) * jax.lax.rsqrt(jnp.exp(log_v) + eps)
        out = [d.astype(jnp.result_type(x)) for d, x in zip(split_elements(direction, shapes), g_leaves)]
        return jax.tree.unflatten(treedef, out), Optim4RLState(carry_m=cm, carry_v=cv)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class Optim4RLRule(LearnedRule):
    """hidden_size: GRU width (8 published); learning_rate: default step size
    (1e-3..3e-3 on gridworlds, 3e-4 on Brax in the paper); grad_clip:
    elementwise gradient clip; eps: inside the square root."""

    kind: ClassVar[str] = "optim4rl"

    hidden_size: int = 8
    learning_rate: float = 1e-3
    grad_clip: float = 1.0
    eps: float = 1e-8

    def __post_init__(self):
        check_positive_int("Optim4RLRule", "hidden_size", self.hidden_size)
        if not self.grad_clip > 0:
            raise ValueError(f"Optim4RLRule.grad_clip must be positive, got {self.grad_clip!r}")

    def init_meta_params(self, key: jax.Array) -> Any:
        ks = jax.random.split(key, 4)
        gru, head = nn.GRUCell(features=self.hidden_size), nn.Dense(1)
        carry, x, h = jnp.zeros((self.hidden_size,)), jnp.zeros((1,)), jnp.zeros((self.hidden_size,))
        return {
            "m_gru": gru.init(ks[0], carry, x), "m_out": head.init(ks[1], h),
            "v_gru": gru.init(ks[2], carry, x), "v_out": head.init(ks[3], h),
        }

    @property
    def default_lr(self) -> float:
        return self.learning_rate

    def make_optimizer(self, meta_params: Any) -> optax.GradientTransformationExtraArgs:
        return optax.chain(
            scale_by_optim4rl(meta_params, self.hidden_size, self.grad_clip, self.eps),
            optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=self.learning_rate),
        )


def from_spec_arg(arg: str, spec: str) -> optax.GradientTransformationExtraArgs:
    """``optim4rl[:seed=N,lr=X,grad_clip=C,hidden=H]``: freshly initialised Optim4RL."""
    kw = parse_kwargs(arg, ("seed", "learning_rate", "grad_clip", "hidden"), spec)
    seed = int(kw.pop("seed", 0))
    if "hidden" in kw:
        kw["hidden_size"] = int(kw.pop("hidden"))
    rule = Optim4RLRule(**kw)
    return rule.make_optimizer(rule.init_meta_params(jax.random.key(seed)))
