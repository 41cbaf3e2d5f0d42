"""Several processes through JAX's own runtime (``jax.distributed``, CPU
collectives through gloo): 2 local processes x 2 CPU devices give the same
results as 1 process x 4 devices, for meta-training in its three modes (ES
over whole lifetimes, ES over pipeline units, meta-gradients), for PBT and
for the benchmark; only process 0 writes and prints. Each test prints the
largest difference it saw (0 everywhere: bit for bit)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

TIMEOUT = 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# XLA's CPU client sizes its intra-op thread pool max(cores, devices of the process), and
# Eigen's contractions split their sums by that size: on a 2-core machine 1 process x 4
# devices would sum in 4 parts and 2 x 2 in 2 (ulp-level differences). The same pool
# everywhere (PJRT_NPROC, read by XLA) makes the per-device computation the same.
THREADS = str(max(len(os.sched_getaffinity(0)), 4))


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("JAX_") and k not in ("XLA_FLAGS", "PJRT_NPROC", "NPROC")}
    env.update(METARL_NO_COMPILE_CACHE="1", PJRT_NPROC=THREADS, **extra)
    return env


def _one_process(script, args, out):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args, "--out", str(out)],
                       cwd=ROOT, env=_env(JAX_NUM_CPU_DEVICES="4"), capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _two_processes(script, args, out):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", script), *args, "--out", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i), JAX_NUM_CPU_DEVICES="2"))
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    return outs


def test_es_two_processes_equal_one_process_with_as_many_devices(tmp_path):
    args = ["--rule", "open", "--envs", "CartPole-v1", "--population", "4", "--seeds", "1", "--timesteps", "1024",
            "--generations", "2", "--reference-returns", "20", "--final-seeds", "0", "--checkpoint-every", "1"]
    one = _one_process("meta_train.py", args, tmp_path / "one")
    (o0, _), (o1, _) = _two_processes("meta_train.py", args, tmp_path / "two")
    assert "4 device(s)" in one.stdout and "4 device(s)" in o0
    assert o1.strip() == ""  # process 1 prints nothing
    a = [json.loads(line) for line in open(tmp_path / "one" / "log.jsonl")]
    b = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for k in ("fitness_mean", "fitness_max", "fitness_min", "mean_candidate_return"):
            np.testing.assert_array_equal(ra[k], rb[k])
    print("max |1 process - 2 processes| of the log:", max(_max_diff(ra[k], rb[k]) for ra, rb in zip(a, b) for k in
                                                         ("fitness_mean", "fitness_max", "fitness_min",
                                                          "mean_candidate_return")))
    assert (tmp_path / "two" / "optimizer").is_dir()
    diff = max(_max_diff(x, y) for x, y in zip(_meta_params(tmp_path / "one", "open"),
                                               _meta_params(tmp_path / "two", "open")))
    print("max |1 process - 2 processes| of optimizer/ meta-parameters:", diff)
    assert diff == 0


def test_pbt_two_processes_equal_one_process_with_as_many_devices(tmp_path):
    args = ["--env", "CartPole-v1", "--population", "4", "--timesteps", "4096", "--interval", "2",
            "--checkpoint-every", "2", "--no-time-selection"]
    _one_process("pbt.py", args, tmp_path / "one")
    (o0, _), (o1, _) = _two_processes("pbt.py", args, tmp_path / "two")
    assert "4 device(s)" in o0 and o1.strip() == ""
    a = json.load(open(tmp_path / "one" / "results.json"))
    b = json.load(open(tmp_path / "two" / "results.json"))
    print("max |1 process - 2 processes| of final and per-member returns:",
          max([_max_diff(a["final_return"], b["final_return"])]
              + [_max_diff(ma["returns"], mb["returns"]) for ma, mb in zip(a["members"], b["members"])]))
    assert a["final_return"] == b["final_return"]
    for ma, mb in zip(a["members"], b["members"]):
        assert ma["returns"] == mb["returns"] and ma["lineage"] == mb["lineage"] and ma["hparams"] == mb["hparams"]


def test_bad_multiprocess_variables_are_one_line_errors(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "pbt.py"), "--out", str(tmp_path)],
                       cwd=ROOT, env=_env(JAX_COORDINATOR_ADDRESS="127.0.0.1:1"), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: JAX_COORDINATOR_ADDRESS=127.0.0.1:1 is set but "
                                                        "JAX_NUM_PROCESSES and JAX_PROCESS_ID are not"), r.stderr


def _max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _rows(path):
    return [json.loads(line) for line in open(path / "log.jsonl")]


def _meta_params(run_dir, rule):
    from learned_optim import registry
    from learned_optim.io import restore_meta_params

    return [np.asarray(x) for x in __import__("jax").tree.leaves(
        restore_meta_params(str(run_dir / "optimizer"), registry.make_rule(rule)))]


def _compare_meta_training(tmp_path, fields, rule):
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(a) == len(b) == 2
    diff = max(_max_diff(ra[k], rb[k]) for ra, rb in zip(a, b) for k in fields)
    pa, pb = _meta_params(tmp_path / "one", rule), _meta_params(tmp_path / "two", rule)
    diff_params = max(_max_diff(x, y) for x, y in zip(pa, pb))
    print(f"max |1 process - 2 processes|: log {diff}, optimizer/ meta-parameters {diff_params}")
    assert diff == 0 and diff_params == 0
    return a


# Tiny pipeline units: a 4-member MLP rule on Catch (9-step episodes), sigma 1 so candidates differ.
UNITS = ["--pipeline-units", "2", "--rule", "mlp", "--envs", "Catch-bsuite", "--generations", "2",
         "--reset-interval", "2", "--num-envs", "4", "--num-steps", "9", "--hidden", "8", "--final-seeds", "0",
         "--checkpoint-every", "1"]


def test_es_over_pipeline_units_two_processes_equal_one_process(tmp_path):
    args = ["--method", "es", "--population", "4", "--inner-steps", "4", "--sigma", "1", *UNITS]
    one = _one_process("meta_train.py", args, tmp_path / "one")
    (o0, _), (o1, e1) = _two_processes("meta_train.py", args, tmp_path / "two")
    assert "4 device(s)" in one.stdout and "4 device(s)" in o0
    assert o1.strip() == "" and e1.strip() == ""  # process 1 prints nothing
    rows = _compare_meta_training(tmp_path, ("fitness_mean", "fitness_max", "fitness_min", "mean_candidate_return",
                                             "es_mean_return"), "mlp")
    assert rows[0]["fitness_max"] != rows[0]["fitness_min"]  # the candidates differ: a real comparison


def test_metagrad_two_processes_equal_one_process(tmp_path):
    """Meta-gradients run replicated: every process computes all units (the
    program is not sharded; no collectives), so the result is one process's."""
    args = ["--method", "metagrad", "--inner-steps", "2", *UNITS]
    _one_process("meta_train.py", args, tmp_path / "one")
    (_, _), (o1, e1) = _two_processes("meta_train.py", args, tmp_path / "two")
    assert o1.strip() == "" and e1.strip() == ""
    _compare_meta_training(tmp_path, ("meta_loss", "unit_return", "grad_norm"), "mlp")


def test_benchmark_two_processes_equal_one_process(tmp_path):
    args = ["--envs", "CartPole-v1", "--optimizers", "adam", "--seeds", "2", "--timesteps", "2048"]
    _one_process("benchmark.py", args, tmp_path / "one")
    (o0, _), (o1, e1) = _two_processes("benchmark.py", args, tmp_path / "two")
    assert "# Benchmark results" in o0 and o1.strip() == "" and e1.strip() == ""
    a = json.load(open(tmp_path / "one" / "results.json"))["cells"]
    b = json.load(open(tmp_path / "two" / "results.json"))["cells"]
    assert [c["optimizer"] for c in a] == [c["optimizer"] for c in b] == ["adam"]
    diff = max(max(_max_diff(ca[k], cb[k]) for k in ("final_return", "curves")) for ca, cb in zip(a, b))
    print(f"max |1 process - 2 processes| of final returns and curves: {diff}")
    assert diff == 0
