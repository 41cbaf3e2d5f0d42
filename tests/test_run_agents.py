"""PBT and ES runs keep their agents like metarl-train; metarl-pbt --replay
retrains the best member's lineage-traced schedule.

One tiny PBT run (4 CartPole members, 16 rounds of 4 updates) is shared by the
PBT tests; the ES test runs the final comparison of meta-training on a saved
OPEN optimizer (what metarl-meta-train does after its last generation)."""

import json
import os

import numpy as np
import pytest

PBT = ["--algo", "pbt", "--env", "CartPole-v1", "--population", "4", "--optimizers", "adam:4", "--interval", "4",
       "--timesteps", "8192", "--num-envs", "4", "--num-steps", "32", "--seed", "0", "--no-time-selection"]
ROUNDS = 16  # 8192 steps / (4 envs x 32 steps) = 64 updates = 16 rounds of 4


def _one_line_error(capsys, message):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


@pytest.fixture(scope="module")
def pbt_run(tmp_path_factory):
    from meta.cli import pbt as pbt_cli

    out = str(tmp_path_factory.mktemp("pbt") / "run")
    try:
        import wandb  # noqa: F401  (then the run also logs offline: test_pbt_rows_reach_wandb)

        extra = ["--wandb", "metarl-test"]
    except ImportError:
        extra = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METARL_NO_COMPILE_CACHE", "1")
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        assert pbt_cli.main(PBT + ["--out", out] + extra) == 0
    with open(os.path.join(out, "results.json")) as f:
        return out, json.load(f)


def expected_schedule(result, member):
    """The hyperparameters that trained ``member``'s final weights, round by
    round, by simulating the copies FORWARD: each member carries the list of
    (values) its weights were trained with; after round r member i takes the
    list of its source lineage[r]. (replay.lineage_path traces backwards.)"""
    names, members = result["hparam_names"], result["members"]
    carried = [[] for _ in members]
    for r in range(result["rounds"]):
        trained = [carried[i] + [[m["hparams"][n][r] for n in names]] for i, m in enumerate(members)]
        carried = [trained[m["lineage"][r]] for m in members]
    return np.asarray(carried[member], np.float64)


def test_pbt_saves_its_best_final_member_for_metarl_eval(pbt_run, capsys):
    from meta.cli import eval as eval_cli
    from meta.saved_agent import load_agent

    out, res = pbt_run
    final = np.asarray(res["final_return"])
    best = res["best_member"]
    assert best == int(np.argmax(final)) and res["members"][best]["lineage"][-1] == best
    saved = load_agent(out)
    doc = saved.document
    assert doc["pbt_member"] == best and doc["seeds"] == 1 and doc["optimizer"] == "adam"
    assert doc["ppo_config"]["num_envs"] == 4 and doc["ppo_config"]["anneal_lr"] is False
    assert np.asarray(saved.tree["update_step"]).tolist() == [ROUNDS * 4]
    # The saved hyperparameters are the member's own after the last round (it kept them).
    last = {n: v[-1] for n, v in res["members"][best]["hparams"].items()}
    for n in ("ent_coef", "clip_eps", "gamma", "gae_lambda", "vf_coef"):
        assert float(np.asarray(getattr(saved.tree["hparams"], n))[0]) == pytest.approx(last[n], rel=1e-6), n
    from agents import core

    lr = core.get_hyperparam(saved.tree["opt_state"], "learning_rate")
    assert float(np.asarray(lr)[0]) == pytest.approx(last["lr"], rel=1e-6)
    assert doc["learning_rate"] == pytest.approx(last["lr"], rel=1e-6)

    assert eval_cli.main([out, "--episodes", "4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 1 and rows[0]["env"] == "CartPole-v1" and len(rows[0]["returns"]) == 4
    assert all(1 <= x <= 500 for x in rows[0]["returns"])
    # The best member of a run whose population reached ~200 plays far above a random policy (~20).
    assert final[best] > 60 and rows[0]["mean_return"] > 40, (final[best], rows[0])


def test_pbt_log_jsonl_has_one_row_per_round_from_the_history(pbt_run):
    out, res = pbt_run
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert rows[-1]["return_best"] == pytest.approx(res["final_return_best"])
    assert rows[-1]["return_mean"] == pytest.approx(res["final_return_mean"])
    for r, row in enumerate(rows):
        fit = [m["returns"][r] for m in res["members"]]
        b = int(np.argmax(fit))
        assert row["return_min"] == pytest.approx(min(fit)) and row["best_lr"] == res["members"][b]["hparams"]["lr"][r]
        assert row["replaced"] == sum(m["lineage"][r] != i for i, m in enumerate(res["members"]))


def test_pbt_rows_reach_wandb(pbt_run):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -e .[wandb])")
    from tests.wandb_offline import offline_history

    out, _ = pbt_run
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert offline_history(out) == rows and len(rows) == ROUNDS


def test_replay_trains_the_lineage_traced_schedule(pbt_run, capsys):
    from meta.cli import pbt as pbt_cli
    from meta.saved_agent import load_agent

    out, res = pbt_run
    assert pbt_cli.main(["--replay", out]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"replay of member {res['best_member']}: return") and "beside the member's" in line
    with open(os.path.join(out, "replay", "results.json")) as f:
        rep = json.load(f)
    expected = expected_schedule(res, res["best_member"])
    names = res["hparam_names"]
    assert expected.shape == (ROUNDS, len(names))
    applied = np.array([rep["applied"][n] for n in names]).T  # read back from the agent before each round
    np.testing.assert_allclose(applied, expected, rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.array([rep["schedule"][n] for n in names]).T, expected, rtol=0, atol=0)
    # Meaningful only if the chain changed hyperparameters (copies and perturbations happened).
    assert len(set(expected[:, names.index("lr")])) > 1
    assert len(set(rep["lineage"])) > 1 and rep["lineage"][-1] == res["best_member"]
    assert rep["updates"] == ROUNDS * 4 and rep["interval"] == 4 and len(rep["replay_returns"]) == ROUNDS
    assert rep["member_return"] == pytest.approx(res["final_return"][res["best_member"]])
    assert np.isfinite(rep["replay_return"]) and rep["replay_return"] > 9.0  # CartPole: >= ~9 even at random
    assert rep["lineage_returns"][-1] == pytest.approx(rep["member_return"])
    # The replayed agent is kept too, with the last round's values and every update done.
    saved = load_agent(os.path.join(out, "replay"))
    assert np.asarray(saved.tree["update_step"]).tolist() == [ROUNDS * 4]
    assert float(np.asarray(saved.tree["hparams"].ent_coef)[0]) == pytest.approx(
        expected[-1, names.index("ent_coef")], rel=1e-6)


def test_replay_bad_input_is_a_one_line_error(tmp_path, pbt_run, capsys):
    from meta.cli import pbt as pbt_cli

    (tmp_path / "empty").mkdir()
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "results.json").write_text(json.dumps({"env": "CartPole-v1", "curves": [[1.0]]}))
    for path, message in [(tmp_path / "missing", "does not exist"), (tmp_path / "empty", "holds no PBT history"),
                          (tmp_path / "train", "is not a PBT run with a history")]:
        assert pbt_cli.main(["--replay", str(path)]) == 2
        _one_line_error(capsys, message)


def _mlp_optimizer(path):
    import jax

    import learned_optim
    from learned_optim import registry

    rule = registry.make_rule("mlp")  # (the cheapest learned rule to compile)
    learned_optim.save(path, rule, rule.init_meta_params(jax.random.key(0)))
    return "lopt:" + os.path.abspath(path)


def test_es_evaluation_agents_layout_and_agent_dir_saves_only_the_agents(tmp_path, capsys, monkeypatch):
    """The mechanism of the final comparison (``train_seeds(agent_dir=...)``)
    on a tiny PPO config; the comparison itself: the slow test below."""
    from agents.presets import resolve_config
    from meta.cli import eval as eval_cli
    from meta.checkpoint import read_document
    from meta.experiment import train_seeds
    from meta.saved_agent import load_agent
    from meta.meta_train.compare import agent_dir_for

    out = str(tmp_path / "es")
    assert agent_dir_for(out, ("Catch-bsuite", "brax/ant"), "Catch-bsuite") == os.path.join(out, "agent")
    assert agent_dir_for(out, ("Catch-bsuite", "brax/ant"), "brax/ant") == os.path.join(out, "agents", "brax_ant",
                                                                                        "agent")
    spec = _mlp_optimizer(os.path.join(out, "optimizer"))
    cfg, hp, lr = resolve_config("CartPole-v1", total_timesteps=8 * 128, num_envs=4, num_steps=32,
                                 hidden_sizes=(16, 16), update_epochs=1, num_minibatches=2)
    res = train_seeds("CartPole-v1", spec, cfg, hp, 2, seed=7, log=None, learning_rate=lr,
                      agent_dir=agent_dir_for(out, ("CartPole-v1",), "CartPole-v1"))
    assert sorted(os.listdir(out)) == ["agent", "optimizer"]  # no checkpoints, no logs: only the agents
    saved = load_agent(out)
    assert saved.document["optimizer"] == spec and saved.document["seed"] == 7
    assert np.asarray(saved.tree["update_step"]).tolist() == [8, 8]
    _, stored = read_document(os.path.join(out, "agent"))
    assert stored["final_return"] == pytest.approx(res["final_return"])
    monkeypatch.chdir(tmp_path)  # the document's optimizer path is absolute: eval works from any directory
    assert eval_cli.main([out, "--episodes", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["seed_index"] for r in rows] == [0, 1] and all(1 <= x <= 500 for r in rows for x in r["returns"])


@pytest.mark.slow  # two PPO compiles of the classic preset (~20 s each on 2 cores)
def test_es_final_comparison_saves_the_learned_optimizers_agents(tmp_path, capsys):
    from meta.cli import eval as eval_cli
    from meta.es import ESConfig
    from meta.saved_agent import load_agent
    from meta.meta_train import compare

    out = str(tmp_path / "es")
    _mlp_optimizer(os.path.join(out, "optimizer"))
    config = ESConfig(envs=("CartPole-v1",), timesteps=2048, seeds=1)
    said = []
    tuning = {"CartPole-v1": dict(lr=3e-4, lr_grid=[1e-4, 3e-4, 1e-3, 3e-3], mean_return=[1.0, 2.0, 1.5, 1.0],
                                  stderr=[0.0] * 4, at_edge=False, tuning_seeds=1, rule="by hand")}
    compare.compare_with_adam(out, config, 2, tuning, said.append)
    learned = [s for s in said if s.startswith("final comparison on CartPole-v1: learned")]
    assert len(learned) == 1 and os.path.exists(os.path.join(out, "summary.md"))
    saved = load_agent(out)
    doc = saved.document
    assert doc["optimizer"] == "lopt:" + os.path.abspath(os.path.join(out, "optimizer")) and doc["seeds"] == 2
    assert doc["seed"] == config.seed + 20_000 and doc["ppo_config"]["total_timesteps"] == 2048
    # The saved final returns are the ones the comparison reported for the learned optimizer.
    reported = float(learned[0].split()[-2])
    from meta.checkpoint import read_document

    _, stored = read_document(os.path.join(out, "agent"))
    assert len(stored["final_return"]) == 2 and np.mean(stored["final_return"]) == pytest.approx(reported, abs=0.01)
    assert eval_cli.main([out, "--episodes", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["seed_index"] for r in rows] == [0, 1] and all(1 <= x <= 500 for r in rows for x in r["returns"])
