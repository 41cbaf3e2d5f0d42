"""Several processes through JAX's own runtime (``jax.distributed``, CPU
collectives through gloo): 2 local processes x 2 CPU devices give the same
results as 1 process x 4 devices, for ES meta-training and for PBT; only
process 0 writes and prints."""

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


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env.update(METARL_NO_COMPILE_CACHE="1", **extra)
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
    assert (tmp_path / "two" / "optimizer").is_dir()


def test_pbt_two_processes_equal_one_process_with_as_many_devices(tmp_path):
    args = ["--env", "CartPole-v1", "--population", "4", "--timesteps", "4096", "--interval", "2",
            "--checkpoint-every", "2", "--no-time-selection"]
    _one_process("pbt.py", args, tmp_path / "one")
    (o0, _), (o1, _) = _two_processes("pbt.py", args, tmp_path / "two")
    assert "4 device(s)" in o0 and o1.strip() == ""
    a = json.load(open(tmp_path / "one" / "results.json"))
    b = json.load(open(tmp_path / "two" / "results.json"))
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
