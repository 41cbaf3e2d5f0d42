"""The env names come from the installed gymnax: every env it registers works
through ``envs.make`` or is rejected there with a one-line reason, which the
CLIs print as ``error: ...`` with exit code 2."""

import urllib.error

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnax.environments import spaces as gymnax_spaces
from gymnax.environments.classic_control.cartpole import CartPole

import envs
from agents.presets import preset_for
from envs import gymnax_env
from meta.cli import train as train_cli

# The names ``envs.GYMNAX_ENVS`` held as a hand-written list; they must keep working.
OLD_NAMES = ("CartPole-v1", "Acrobot-v1", "Pendulum-v1", "MountainCar-v0", "MountainCarContinuous-v0",
             "Asterix-MinAtar", "Breakout-MinAtar", "Freeway-MinAtar", "SpaceInvaders-MinAtar",
             "Catch-bsuite", "DeepSea-bsuite")
MINATAR = ("Asterix-MinAtar", "Breakout-MinAtar", "Freeway-MinAtar", "Seaquest-MinAtar", "SpaceInvaders-MinAtar")
# Registered gymnax envs whose spaces or API we cannot use: name -> what the error says.
# None in gymnax 1.0.1 (FrozenLake's Discrete observation is one-hot encoded).
UNSUPPORTED = {}
# Envs gymnax builds from a downloaded data set: they work when the data is
# there (tests give them a fake loader) and are rejected, saying so, when not.
NEEDS_DATA = {"MNISTBandit-bsuite": "needs its data set in"}


@pytest.fixture
def fake_mnist(monkeypatch):
    """MNIST as gymnax's loader returns it, random and small, without the network."""
    from gymnax.utils import load_mnist

    rng = np.random.default_rng(0)
    train = (rng.integers(0, 127, (32, 28, 28)).astype(np.int8), rng.integers(0, 10, 32).astype(np.uint8))
    monkeypatch.setattr(load_mnist, "load_mnist", lambda directory="/tmp/mnist": (train, train))


@pytest.fixture
def no_mnist(monkeypatch, tmp_path):
    """No MNIST files, and no network to download them from."""
    from gymnax.utils import load_mnist

    def offline(directory="/tmp/mnist"):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(load_mnist, "load_mnist", offline)
    monkeypatch.setitem(gymnax_env._DATA, "MNISTBandit-bsuite", (str(tmp_path), gymnax_env._DATA["MNISTBandit-bsuite"][1]))


def _one_line_error(capsys, argv, message):
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    return lines[0]


def test_names_come_from_the_gymnax_registry(no_mnist):
    registered = gymnax_env.registered()
    assert registered == tuple(gymnax.registered_envs) and len(registered) >= 26
    works, broken = envs.GYMNAX_ENVS, gymnax_env.unsupported()
    assert set(works).isdisjoint(broken) and set(works) | set(broken) == set(registered)
    assert set(broken) == set(UNSUPPORTED) | set(NEEDS_DATA)
    assert set(OLD_NAMES) <= set(works) and "Seaquest-MinAtar" in works and "FrozenLake-misc" in works
    known = envs.known_envs()
    assert known == works + tuple(f"brax/{n}" for n in envs.BRAX_ENVS) + envs.GRIDWORLD_ENVS


@pytest.mark.parametrize("name", gymnax.registered_envs)
def test_each_registered_gymnax_env_works_or_says_why(name, fake_mnist):
    if name in UNSUPPORTED:
        with pytest.raises(ValueError, match=UNSUPPORTED[name]) as e:
            envs.make(name)
        assert name in str(e.value) and "\n" not in str(e.value)
        return
    envs.check_name(name)
    env, params = envs.make_bare(name)  # the adapter alone
    obs_space, act_space = env.observation_space(params), env.action_space(params)

    def reset_and_step(key):  # one compilation (cheaper than running the two eagerly)
        k_reset, k_action, k_step = jax.random.split(key, 3)
        obs, state = env.reset(k_reset, params)
        return obs, state, env.step(k_step, state, act_space.sample(k_action), params)

    obs, state, (obs2, state2, reward, terminated, truncated, info) = jax.jit(reset_and_step)(jax.random.key(0))
    for o in (obs, obs2):
        assert o.shape == obs_space.shape and o.dtype == jnp.float32 and bool(jnp.isfinite(o).all())
    assert reward.shape == () and reward.dtype == jnp.float32 and bool(jnp.isfinite(reward))
    assert terminated.dtype == jnp.bool_ and truncated.dtype == jnp.bool_ and set(info) == {"discount"}
    assert isinstance(act_space, envs.Discrete) or len(act_space.shape) == 1
    # The state keeps its structure, shapes and dtypes through a step (scan carries
    # need that; the wrappers of envs.make keep what the adapter gives them).
    assert jax.tree.structure(state) == jax.tree.structure(state2)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state2)):
        assert (a.shape, a.dtype, a.weak_type) == (b.shape, b.dtype, b.weak_type)
    assert preset_for(name) == ("minatar" if name.endswith("-MinAtar") else "classic")


def test_discrete_observation_is_one_hot():
    env, params = envs.make_bare("FrozenLake-misc")
    obs, state = env.reset(jax.random.key(0), params)
    assert env.observation_space(params).shape == (16,) and env.binary_observations
    np.testing.assert_array_equal(obs, np.eye(16, dtype=np.float32)[int(state.position)])


def test_minatar_suite_is_the_five_games():
    assert envs.expand_suites("minatar") == list(MINATAR)
    assert set(MINATAR) == {n for n in gymnax.registered_envs if n.endswith("-MinAtar")}
    assert all(preset_for(n) == "minatar" for n in envs.expand_suites("minatar"))


class _DictObsCartPole(CartPole):
    def observation_space(self, params):
        return gymnax_spaces.Dict({"x": super().observation_space(params)})

    def step_env(self, *args):
        raise AssertionError("stepped an env that should have been rejected at make time")


class _TupleActionCartPole(CartPole):
    def action_space(self, params=None):
        return gymnax_spaces.Tuple([gymnax_spaces.Discrete(2), gymnax_spaces.Discrete(2)])


class _MatrixActionCartPole(CartPole):
    def action_space(self, params=None):
        return gymnax_spaces.Box(-1.0, 1.0, (2, 2))


@pytest.fixture
def fake_gymnax_envs(monkeypatch):
    fakes = {"Fake-dict": _DictObsCartPole, "Fake-tuple": _TupleActionCartPole, "Fake-matrix": _MatrixActionCartPole}
    real_make = gymnax.make

    def make(name, **kwargs):
        if name in fakes:
            env = fakes[name]()
            return env, env.default_params
        return real_make(name, **kwargs)

    monkeypatch.setattr(gymnax, "make", make)
    monkeypatch.setattr(gymnax, "registered_envs", list(gymnax.registered_envs) + list(fakes))


def test_unsupported_spaces_are_rejected_at_make_time(fake_gymnax_envs, capsys):
    expected = {
        "Fake-dict": "gymnax env 'Fake-dict' has a Dict observation space; this project supports Discrete and Box",
        "Fake-tuple": "gymnax env 'Fake-tuple' has a Tuple action space; this project supports Discrete and Box",
        "Fake-matrix": "gymnax env 'Fake-matrix' has a Box action space of shape (2, 2); "
                       "this project supports 1-D Box actions",
    }
    for name, message in expected.items():
        for call in (envs.make, envs.check_name, envs.expand_suites):
            with pytest.raises(ValueError) as e:
                call(name)
            assert str(e.value) == message
    assert {n: r for n, r in gymnax_env.unsupported().items() if n in expected} == expected
    assert not set(expected) & set(envs.known_envs())
    _one_line_error(capsys, ["--env", "Fake-dict", "--seeds", "1"], expected["Fake-dict"])


def test_env_needing_a_data_set_says_so(no_mnist, capsys):
    listed = gymnax_env.problem("MNISTBandit-bsuite", download=False)
    assert "needs its data set in" in listed and "not there" in listed
    with pytest.raises(ValueError, match="MNISTBandit-bsuite.*needs its data set in.*failed .URLError"):
        envs.make("MNISTBandit-bsuite")
    _one_line_error(capsys, ["--env", "MNISTBandit-bsuite"], "needs its data set in")


def test_unknown_env_is_a_one_line_error(capsys):
    line = _one_line_error(capsys, ["--env", "CartPol-v1"], "unknown env 'CartPol-v1'; known envs: ")
    assert "Seaquest-MinAtar" in line and "brax/ant" in line
    _one_line_error(capsys, ["--env", "brax/nope"], "unknown env 'brax/nope'")
    _one_line_error(capsys, ["--env", "gridworld/nope"], "unknown env 'gridworld/nope'")


def test_listing_groups_every_name_and_the_reasons(no_mnist, capsys):
    from envs.__main__ import main

    assert main([]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    names = {line.strip().split()[0] for line in lines if line.startswith("  ") and ": " not in line}
    assert names == set(envs.known_envs())
    groups = [line for line in lines if not line.startswith("  ")]
    assert groups[0] == f"gymnax ({len(envs.GYMNAX_ENVS)} of the {len(gymnax.registered_envs)} envs gymnax registers):"
    assert any(g.startswith("brax (") for g in groups) and any(g.startswith("gridworld (") for g in groups)
    assert "  MNISTBandit-bsuite: gymnax env 'MNISTBandit-bsuite' needs its data set in" in text
