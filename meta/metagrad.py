"""Meta-gradient training of a learned update rule (Optim4RL style).

For every training unit: ``K`` inner A2C updates with the optimizer built from
the traced ``meta_params``, then the A2C loss of the updated agent on a fresh
rollout; the gradient of that loss flows back through the K inner updates
(parameters and optimizer state) into ``meta_params``. Gradients are averaged
over the pipeline units (``vmap``) and over several envs (a Python loop at
trace time), then applied by an optax meta-optimizer (clip + Adam).
The units then continue from their post-update state (stop-gradient); the
pipeline resets them on their staggered schedule.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

from agents.a2c import A2CConfig, A2CHParams
from meta.pipeline import PipelineConfig, PipelineState, make_pipeline
from meta.units import make_a2c_units


def unrolled_loss(meta_params, params, opt_state, make_tx: Callable, inner_grad: Callable,
                  outer_loss: Callable, num_inner: int):
    """Generic K-step unroll: ``params <- params + tx(meta).update(inner_grad(params, k))``
    for ``k < num_inner``, then ``outer_loss(params)``. Returns ``(loss, (params, opt_state))``;
    differentiable in ``meta_params``."""
    tx = make_tx(meta_params)

    def body(carry, k):
        p, s = carry
        g = inner_grad(p, k)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), jnp.arange(num_inner))
    return outer_loss(params), (params, opt_state)


@dataclasses.dataclass(frozen=True)
class MetaGradConfig:
    num_inner: int = 4
    meta_lr: float = 1e-3
    meta_grad_clip: float = 1.0
    pipeline: PipelineConfig = PipelineConfig(num_units=4, reset_interval=64)

    def __post_init__(self):
        if not isinstance(self.num_inner, int) or self.num_inner < 1:
            raise ValueError(f"MetaGradConfig.num_inner must be a positive integer, got {self.num_inner!r}")
        if not self.meta_lr > 0:
            raise ValueError(f"MetaGradConfig.meta_lr must be > 0, got {self.meta_lr!r}")


class MetaGradState(NamedTuple):
    meta_params: Any
    meta_opt_state: Any
    pipes: Tuple[PipelineState, ...]  # one per env
    step: jax.Array


class MetaGradTrainer(NamedTuple):
    init: Callable  # key -> MetaGradState
    step: Callable  # MetaGradState -> (MetaGradState, metrics)
    agents: Tuple[Any, ...]
    rule: Any
    config: MetaGradConfig


def make_metagrad(config: MetaGradConfig, rule, env_pairs: Sequence[Tuple[Any, Any]],
                  a2c_config: A2CConfig, hparams: A2CHParams, learning_rate=None) -> MetaGradTrainer:
    """``env_pairs``: ``[(env, env_params), ...]`` from ``envs.make``; ``rule``: a
    ``learned_optim`` rule (e.g. ``registry.make_rule("optim4rl")``);
    ``learning_rate``: the units' agent learning rate (None: the rule's own)."""
    if not env_pairs:
        raise ValueError("make_metagrad: env_pairs must name at least one env")
    unit_fns = tuple(make_a2c_units(rule, env, p, a2c_config, hparams, learning_rate) for env, p in env_pairs)
    agents = tuple(u.agent for u in unit_fns)
    meta_opt = optax.chain(optax.clip_by_global_norm(config.meta_grad_clip), optax.adam(config.meta_lr))
    pipelines = tuple(make_pipeline(config.pipeline, u.init) for u in unit_fns)

    def unit_loss(meta_params, unit, u):
        st, _ = u.run(unit, u.make_tx(meta_params), config.num_inner)
        st, traj = u.agent.rollout(st)  # fresh rollout for the meta-objective
        loss, aux = u.agent.loss(st.params, traj, st.obs, st.hparams)
        return loss, (jax.lax.stop_gradient(st), st.last_return)

    def init(key):
        k_meta, k_pipe = jax.random.split(key)
        meta_params = rule.init_meta_params(k_meta)
        pipes = tuple(p.init(k, meta_params) for p, k in zip(pipelines, jax.random.split(k_pipe, len(pipelines))))
        return MetaGradState(meta_params, meta_opt.init(meta_params), pipes, jnp.zeros((), jnp.int32))

    def step(state: MetaGradState):
        pipes = [p.maybe_reset(s, state.meta_params)[0] for p, s in zip(pipelines, state.pipes)]

        def total_loss(meta_params):
            losses, units, returns = [], [], []
            for fns, ps in zip(unit_fns, pipes):
                l, (u, r) = jax.vmap(lambda unit: unit_loss(meta_params, unit, fns))(ps.units)
                losses.append(l.mean())
                units.append(u)
                returns.append(r)
            return jnp.mean(jnp.stack(losses)), (losses, units, returns)

        (loss, (losses, units, returns)), grads = jax.value_and_grad(total_loss, has_aux=True)(state.meta_params)
        updates, meta_opt_state = meta_opt.update(grads, state.meta_opt_state, state.meta_params)
        meta_params = optax.apply_updates(state.meta_params, updates)
        new_pipes = tuple(p.advance(s, u) for p, s, u in zip(pipelines, pipes, units))
        metrics = dict(meta_loss=loss, env_losses=jnp.stack(losses),
                       unit_returns=jnp.stack([r.mean() for r in returns]),
                       grad_norm=optax.global_norm(grads),
                       finite=jnp.all(jnp.isfinite(rule.flatten(meta_params))))
        return MetaGradState(meta_params, meta_opt_state, new_pipes, state.step + 1), metrics

    return MetaGradTrainer(init, step, agents, rule, config)
