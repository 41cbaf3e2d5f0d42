"""metarl-eval --gif: gymnax's visualiser draws a saved agent's play; envs
without a renderer are a one-line error.

The agents here are saved untrained (``init`` only, no PPO update to
compile): an untrained CartPole policy ends an episode every ~10-40 steps, so
a short GIF holds episode ends and resets."""

import os
import sys

import numpy as np
import pytest


def save_untrained(run_dir, env_name, **overrides):
    """An untrained one-seed PPO agent in ``run_dir/agent`` (metarl-train's layout)."""
    import jax

    import envs
    import learned_optim
    from agents.ppo import PPOHParams, make_ppo
    from agents.presets import resolve_config
    from meta.experiment import agent_tree, evaluation_keys, run_document, save_agent

    cfg, hp, lr = resolve_config(env_name, total_timesteps=1024, num_envs=2, num_steps=8, hidden_sizes=(8,),
                                 update_epochs=1, num_minibatches=1, **overrides)
    doc = run_document(env_name, "adam", cfg, hp, lr, 1, 0)
    env, env_params = envs.make(env_name)
    agent = make_ppo(cfg, env, env_params, learned_optim.from_spec(doc["optimizer_as_built"]))
    hp1 = jax.tree.map(lambda x: np.broadcast_to(np.float32(x), (1,)), PPOHParams.default(**hp))
    state = jax.jit(jax.vmap(agent.init))(evaluation_keys(0, 1), hp1, np.full((1,), lr, np.float32))
    save_agent(os.path.join(run_dir, "agent"), 0, agent_tree(state), doc, [0.0])
    return str(run_dir)


def _one_line_error(capsys, message):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory):
    return save_untrained(tmp_path_factory.mktemp("cartpole"), "CartPole-v1")


def test_gif_of_cartpole_shows_every_step_and_the_resets(cartpole, tmp_path, capsys):
    pytest.importorskip("pygame", reason="Gymnasium's classic-control renderer needs pygame (the [render] extra)")
    from PIL import Image

    from meta.cli import eval as eval_cli
    from meta.saved_agent import load_agent
    from meta.render import play_frames

    path = str(tmp_path / "gifs" / "cartpole.gif")
    assert eval_cli.main([cartpole, "--episodes", "1", "--gif", path, "--gif-frames", "40"]) == 0
    err = capsys.readouterr().err
    assert "rendered 40 steps of seed 0" in err and path in err
    with Image.open(path) as im:
        assert im.n_frames == 40 and im.size == (600, 500)
        frames = []
        for t in (0, 20, 39):
            im.seek(t)
            frames.append(np.asarray(im.convert("RGB"), np.int32))
    assert all(np.abs(a - b).sum() > 0 for a, b in zip(frames, frames[1:]))  # the picture moves

    # The frames are the states the agent played through: CartPole pays 1 per step, and after
    # every episode end the next frame is a fresh reset (|x|, |theta| <= 0.05).
    states, rewards, done = play_frames(load_agent(cartpole), 40)
    assert np.all(np.asarray(rewards) == 1.0) and np.asarray(states.x).shape == (40,)
    ends = np.flatnonzero(done)
    assert ends.size >= 1, "an untrained policy ends CartPole episodes within 40 steps"
    for t in ends[ends < 39]:
        assert abs(states.x[t + 1]) <= 0.05 and abs(states.theta[t + 1]) <= 0.05
        assert abs(states.theta[t]) > 0.05 or abs(states.x[t]) > 0.05
    lengths = np.diff(np.concatenate([[-1], ends])).tolist()
    assert f"returns {[float(n) for n in lengths]}" in err


def test_gif_bad_input_is_a_one_line_error(cartpole, tmp_path, capsys, monkeypatch):
    from meta.cli import eval as eval_cli
    from meta.render import check_renderable

    gridworld = save_untrained(tmp_path / "grid", "gridworld/small_sparse_short")
    for argv, message in [
        ([gridworld, "--gif", str(tmp_path / "g.gif")], "env 'gridworld/small_sparse_short' has no renderer"),
        ([cartpole, "--gif", str(tmp_path / "g.mp4")], "give a path ending in .gif"),
        ([cartpole, "--gif", str(tmp_path / "g.gif"), "--gif-frames", "0"], "--gif-frames must be >= 1"),
        ([cartpole, "--gif", str(tmp_path / "g.gif"), "--gif-seed-index", "1"], "--gif-seed-index must be in [0, 1)"),
    ]:
        assert eval_cli.main(argv) == 2
        _one_line_error(capsys, message)
    assert not os.path.exists(tmp_path / "g.gif")
    with pytest.raises(ValueError, match=r"Brax envs render to an HTML page"):
        check_renderable("brax/ant", "ant.gif")
    assert check_renderable("brax/ant", "ant.html") == "html" and check_renderable("Catch-bsuite", "c.gif") == "gif"
    monkeypatch.setitem(sys.modules, "pygame", None)  # as if pygame were not installed
    assert eval_cli.main([cartpole, "--gif", str(tmp_path / "g.gif")]) == 2
    _one_line_error(capsys, "needs pygame")
    assert check_renderable("Breakout-MinAtar", "b.gif") == "gif"  # drawn with matplotlib alone


@pytest.mark.slow  # the Brax step compiles for ~30 s on 2 cores
def test_brax_renders_html(tmp_path, capsys):
    from meta.cli import eval as eval_cli

    run = save_untrained(tmp_path / "brax", "brax/inverted_pendulum")
    path = str(tmp_path / "pendulum.html")
    assert eval_cli.main([run, "--episodes", "1", "--gif", path, "--gif-frames", "20"]) == 0
    html = open(path).read()
    assert html.startswith("<!DOCTYPE html>") and "brax" in html.lower()
