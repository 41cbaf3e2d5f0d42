"""scripts/gpu_check.sh, the prepared accelerator check, run on CPU with tiny
sizes (TINY=1): it prints every figure, each a finite number."""

import math
import os
import re
import subprocess
import sys

from tests.conftest import ROOT

FIGURE = re.compile(r"^FIGURE (\S+) = (\S+) (.+)$")
EXPECTED = [
    r"ppo_steps_per_second\[Breakout-MinAtar,members=1\]",
    r"ppo_steps_per_second\[Breakout-MinAtar,members=2\]",
    r"cost_vs_adam\[open,Breakout-MinAtar,members=2\]",
    r"cost_vs_adam\[kfac,Breakout-MinAtar,members=2\]",
    r"cost_vs_adam\[diag_ggn,Breakout-MinAtar,members=2\]",
    r"es_generation_seconds\[open,Breakout-MinAtar,population=4,lifetime=64\]",
    r"es_env_steps_per_second\[open,Breakout-MinAtar,population=4\]",
    r"ppo_steps_per_second\[brax/ant,members=1\]",
]


def test_gpu_check_prints_every_figure_with_tiny_sizes():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PUREJAXRL")}
    env.update(TINY="1", PYTHON=sys.executable, METARL_NO_COMPILE_CACHE="1")
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    figures = {}
    for line in r.stdout.splitlines():
        m = FIGURE.match(line)
        if m:
            figures[m.group(1)] = float(m.group(2))
    print(r.stdout)
    for pattern in EXPECTED:
        hits = [name for name in figures if re.fullmatch(pattern, name)]
        assert hits, f"{pattern} missing from:\n{r.stdout}"
    assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures
    assert r.stdout.splitlines()[0].startswith("device: cpu")
    assert "purejaxrl: not compared" in r.stdout
