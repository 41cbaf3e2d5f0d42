"""Generic learned optimizers: per-parameter MLP (LOLv2 style), GRU and LSTM rules.

Every rule maps per-element input features to two outputs, a direction
``d`` and a log-magnitude ``s``, and steps ::

    update = -d * step_mult * exp(s * exp_mult)

Input features (``features``, any subset, in this fixed order):

per tensor, normalised together by ``x / sqrt(1e-5 + mean(x**2))``:
    "param"     the parameter value                               (1)
    "grad"      the gradient                                      (1)
    "momenta"   EMAs of g, one per beta in ``betas``              (K)
    "rms"       g and each momentum divided by sqrt(v + 1e-8), v the
                EMA of g**2 with ``rms_beta``                     (1 + K)
    "sign_log"  sign and log(|x| + 1e-13) of g and each momentum  (2 + 2K)
not normalised:
    "time"      train_fraction, batch_fraction (extra args)       (2)
    "layer"     layer proportion (see ``layout.LeafInfo``)        (1)
    "dormancy"  the output neuron's dormancy (asks for ``layer_stats``
                outputs; neutral 1.0)                             (1)
    "actor"     1.0 for actor parameters, else 0.0                (1)

Cores: ``MLPRule`` (stateless apart from momenta; relu hidden layers),
``GRURule`` and ``LSTMRule`` (a recurrent cell per element, its state in the
optimizer state, then an optional relu head). The last layer is initialised
small (``out_scale``) so a fresh rule starts near a tiny random step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from learned_optim.cells import gru_cell, gru_weights
from learned_optim.context import Context, read_context
from learned_optim.features import flat_dormancy, normalise_by_tensor, update_momenta
from learned_optim.layout import FlatLayout, flat_layout, flatten_elements, leaf_infos, split_elements
from learned_optim.rule import LearnedRule, check_positive_int
from learned_optim.spec import parse_kwargs

FEATURES = ("param", "grad", "momenta", "rms", "sign_log", "time", "layer", "dormancy", "actor")
NORMALISED = ("param", "grad", "momenta", "rms", "sign_log")
LOG_EPS = 1e-13


class RuleState(NamedTuple):
    """momenta: like params, leaves ``[..., K]`` (None if no feature uses them).
    rms:     like params, leaves ``[...]`` EMA of g**2 (None unless "rms").
    carry:   tuple of trees like params with leaves ``[..., H]`` (GRU: (h,),
             LSTM: (c, h), MLP: ()).
    count:   int32 scalar."""

    momenta: Any
    rms: Any
    carry: Tuple[Any, ...]
    count: jax.Array


class RuleStateWithStats(RuleState):
    """``RuleState`` of a rule using "dormancy": asks agents for layer outputs."""

    __slots__ = ()
    required_stats = frozenset({"outputs"})


class _Head(nn.Module):
    """relu MLP ``[..., F] -> [..., 2]``."""

    hidden_sizes: Tuple[int, ...]
    out_scale: float

    @nn.compact
    def __call__(self, x):
        for h in self.hidden_sizes:
            x = nn.relu(nn.Dense(h)(x))
        init = nn.initializers.variance_scaling(self.out_scale ** 2, "fan_in", "truncated_normal")
        return nn.Dense(2, kernel_init=init)(x)


@dataclasses.dataclass(frozen=True)
class _PerParamRule(LearnedRule):
    features: Tuple[str, ...] = ("param", "grad", "momenta", "rms", "time")
    betas: Tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
    rms_beta: float = 0.999
    step_mult: float = 0.001
    exp_mult: float = 0.001
    out_scale: float = 0.01

    def __post_init__(self):
        name = type(self).__name__
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown or not self.features or len(set(self.features)) != len(self.features):
            raise ValueError(
                f"{name}.features={self.features!r}: need distinct names from {', '.join(FEATURES)}"
            )
        if not all(0.0 <= b < 1.0 for b in self.betas) or not 0.0 <= self.rms_beta < 1.0:
            raise ValueError(f"{name}: betas and rms_beta must lie in [0, 1), got {self.betas}, {self.rms_beta}")
        if not self.betas and {"momenta", "sign_log"} & set(self.features):
            raise ValueError(f"{name}: features 'momenta'/'sign_log' need at least one beta")

    # Features ---------------------------------------------------------------------

    @property
    def num_features(self) -> int:
        k = len(self.betas)
        sizes = dict(param=1, grad=1, momenta=k, rms=1 + k, sign_log=2 + 2 * k,
                     time=2, layer=1, dormancy=1, actor=1)
        return sum(sizes[f] for f in self.features)

    @property
    def _uses_momenta(self) -> bool:
        return bool({"momenta", "rms", "sign_log"} & set(self.features))

    def _features(self, p, g, m, v, ctx: Context, infos, layout: FlatLayout) -> jax.Array:
        """``[N, num_features]`` for all elements laid end to end.

        p, g: ``[N]``; m: ``[N, K]`` updated momenta (or None); v: ``[N]``
        updated EMA of g**2 (or None); infos/layout: see ``learned_optim.layout``.
        """
        n = g.shape[0]
        norm, const = [], []
        for f in self.features:
            if f == "param":
                norm.append(p[:, None])
            elif f == "grad":
                norm.append(g[:, None])
            elif f == "momenta":
                norm.append(m)
            elif f == "rms":
                r = jax.lax.rsqrt(v + 1e-8)[:, None]
                norm += [g[:, None] * r, m * r]
            elif f == "sign_log":
                gm = jnp.concatenate([g[:, None], m], axis=-1)
                norm += [jnp.sign(gm), jnp.log(jnp.abs(gm) + LOG_EPS)]
            elif f == "time":
                const += [jnp.broadcast_to(ctx.train_fraction, (n,)), jnp.broadcast_to(ctx.batch_fraction, (n,))]
            elif f == "layer":
                const.append(jnp.asarray(layout.layer_prop))
            elif f == "dormancy":
                const.append(flat_dormancy(ctx.layer_stats, infos, layout))
            elif f == "actor":
                const.append(jnp.asarray(layout.is_actor))
        parts = [normalise_by_tensor(jnp.concatenate(norm, axis=-1), layout.spans, axis=0)] if norm else []
        parts += [c.astype(jnp.float32)[:, None] for c in const]
        return jnp.concatenate(parts, axis=-1)

    # Core (subclasses) ----------------------------------------------------------------

    def _carry_sizes(self) -> Tuple[int, ...]:
        return ()

    def _init_core(self, key):
        raise NotImplementedError

    def _apply_core(self, meta_params, carry, x):
        """``x [N, F]``, carry tuple of ``[N, H]`` -> (carry, outputs ``[N, 2]``)."""
        raise NotImplementedError

    # The rule interface -----------------------------------------------------------------

    def init_meta_params(self, key: jax.Array) -> Any:
        return self._init_core(key)

    def make_optimizer(self, meta_params: Any) -> optax.GradientTransformationExtraArgs:
        rule = self
        state_cls = RuleStateWithStats if "dormancy" in self.features else RuleState
        k = len(self.betas)

        def init_fn(params):
            def zeros(extra=()):
                return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p) + extra, jnp.float32), params)
            return state_cls(
                momenta=zeros((k,)) if rule._uses_momenta else None,
                rms=zeros() if "rms" in rule.features else None,
                carry=tuple(zeros((h,)) for h in rule._carry_sizes()),
                count=jnp.zeros((), jnp.int32),
            )

        def update_fn(updates, state, params=None, **extra):
            if params is None and "param" in rule.features:
                raise ValueError(f"{type(rule).__name__} with feature 'param' needs the current params")
            ctx = read_context(extra, state.count)
            g_leaves, treedef = jax.tree.flatten(updates)
            p_leaves = treedef.flatten_up_to(params) if params is not None else g_leaves
            infos = leaf_infos(jax.tree.unflatten(treedef, p_leaves))
            layout = flat_layout(infos, [jnp.shape(x) for x in g_leaves])
            split = lambda flat: jax.tree.unflatten(treedef, split_elements(flat, layout.shapes))  # noqa: E731

            g = flatten_elements(g_leaves)
            m = v = new_m = new_v = None
            if state.momenta is not None:
                m = update_momenta(flatten_elements(treedef.flatten_up_to(state.momenta), (k,)), g, rule.betas)
                new_m = split(m)
            if state.rms is not None:
                v = rule.rms_beta * flatten_elements(treedef.flatten_up_to(state.rms)) + (1 - rule.rms_beta) * g * g
                new_v = split(v)
            p = flatten_elements(p_leaves) if "param" in rule.features else None
            x = rule._features(p, g, m, v, ctx, infos, layout)
            carry = tuple(flatten_elements(treedef.flatten_up_to(c), (h,))
                          for c, h in zip(state.carry, rule._carry_sizes()))
            carry, o = rule._apply_core(meta_params, carry, x)
            step = o[:, 0] * rule.step_mult * jnp.exp(o[:, 1] * rule.exp_mult)
            out = [(-s).astype(jnp.result_type(u)) for s, u in zip(split_elements(step, layout.shapes), g_leaves)]
            new_state = state_cls(momenta=new_m, rms=new_v, carry=tuple(split(c) for c in carry),
                                  count=state.count + 1)
            return jax.tree.unflatten(treedef, out), new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class MLPRule(_PerParamRule):
    """Per-element MLP (LOLv2 style): features -> relu ``hidden_sizes`` -> (d, s)."""

    kind: ClassVar[str] = "mlp"
    hidden_sizes: Tuple[int, ...] = (32, 32)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
        for h in self.hidden_sizes:
            check_positive_int("MLPRule", "hidden_sizes", h)

    def _init_core(self, key):
        return _Head(self.hidden_sizes, self.out_scale).init(key, jnp.zeros((self.num_features,)))

    def _apply_core(self, meta_params, carry, x):
        return carry, _Head(self.hidden_sizes, self.out_scale).apply(meta_params, x)


@dataclasses.dataclass(frozen=True)
class _RecurrentRule(_PerParamRule):
    hidden_size: int = 16
    head_sizes: Tuple[int, ...] = (16,)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "head_sizes", tuple(self.head_sizes))
        check_positive_int(type(self).__name__, "hidden_size", self.hidden_size)
        for h in self.head_sizes:
            check_positive_int(type(self).__name__, "head_sizes", h)

    def _cell(self) -> nn.Module:
        """The flax cell whose parameters the rule holds (its ``init``)."""
        raise NotImplementedError

    def _step_cell(self, cell_params, carry, x):
        """``x [N, F]``, carry tuple of ``[N, H]`` -> (carry, outputs ``[N, H]``)."""
        raise NotImplementedError

    def _init_core(self, key):
        k_cell, k_head = jax.random.split(key)
        carry = tuple(jnp.zeros((h,)) for h in self._carry_sizes())
        carry = carry[0] if len(carry) == 1 else carry
        return {
            "cell": self._cell().init(k_cell, carry, jnp.zeros((self.num_features,))),
            "head": _Head(self.head_sizes, self.out_scale).init(k_head, jnp.zeros((self.hidden_size,))),
        }

    def _apply_core(self, meta_params, carry, x):
        carry, h = self._step_cell(meta_params["cell"], carry, x)
        return carry, _Head(self.head_sizes, self.out_scale).apply(meta_params["head"], h)


@dataclasses.dataclass(frozen=True)
class GRURule(_RecurrentRule):
    """Per-element GRU(hidden_size) -> relu ``head_sizes`` -> (d, s)."""

    kind: ClassVar[str] = "gru"

    def _carry_sizes(self):
        return (self.hidden_size,)

    def _cell(self):
        return nn.GRUCell(features=self.hidden_size)

    def _step_cell(self, cell_params, carry, x):
        h = gru_cell(gru_weights(cell_params), carry[0].T, x.T).T
        return (h,), h


@dataclasses.dataclass(frozen=True)
class LSTMRule(_RecurrentRule):
    """Per-element LSTM(hidden_size) -> relu ``head_sizes`` -> (d, s)."""

    kind: ClassVar[str] = "lstm"

    def _carry_sizes(self):
        return (self.hidden_size, self.hidden_size)  # (c, h), flax's order

    def _cell(self):
        return nn.LSTMCell(features=self.hidden_size)

    def _step_cell(self, cell_params, carry, x):
        (c, h), out = self._cell().apply(cell_params, tuple(carry), x)
        return (c, h), out


# Spec builders (``learned_optim.registry``) -----------------------------------------


def spec_builder(rule_cls: type) -> Callable[[str, str], optax.GradientTransformationExtraArgs]:
    """``(arg, spec) -> transform`` for ``NAME[:seed=N,hidden=H,step_mult=X,exp_mult=Y]``:
    a fresh ``rule_cls``; ``hidden`` sets the MLP's two layer widths or the
    recurrent cell's size."""

    def build(arg: str, spec: str) -> optax.GradientTransformationExtraArgs:
        kw = parse_kwargs(arg, ("seed", "hidden", "step_mult", "exp_mult"), spec)
        seed = int(kw.pop("seed", 0))
        if "hidden" in kw:
            h = int(kw.pop("hidden"))
            if issubclass(rule_cls, MLPRule):
                kw["hidden_sizes"] = (h, h)
            else:
                kw["hidden_size"] = h
        rule = rule_cls(**kw)
        return rule.make_optimizer(rule.init_meta_params(jax.random.key(seed)))

    return build
