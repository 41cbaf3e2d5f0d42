#!/usr/bin/env python
"""Hand-written mutants: does the test suite catch the bugs a developer would make?

Each mutant is one realistic edit (an off-by-one, a wrong sign, a dropped term,
a wrong constant, swapped arguments, a setting ignored) of one exact snippet in
one module, and the few test files (or test ids) that must catch it. For every
mutant, one at a time, the script copies the repository's files (tracked and
untracked-but-not-ignored, as they are on disk) into a temporary directory
once, applies the edit there, runs

    python -m pytest -q -x -p no:cacheprovider -n0 <the mutant's tests>

in the copy (``PYTHONPATH`` points at the copy, so subprocesses that the tests
start import the mutated code too, not the editable install), puts the file back,
and records ``caught`` (a test failed or errored), ``survived`` (all passed),
``timeout`` or ``error`` (pytest itself could not run them: no tests, bad path).
The working tree is never modified.

    python scripts/mutation_check.py --list
    python scripts/mutation_check.py --only gae_trace_not_cut_at_done
    python scripts/mutation_check.py --out docs/mutation_check.json      # all of them (~15 min on 2 idle cores)
    python scripts/mutation_check.py --check                              # only check that every snippet is unique

Not part of the default test suite (``tests/``): it runs pytest dozens of times.
``docs/mutation_check.md`` has the figures and what each survivor means.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

from mutants import MUTANTS, Mutant  # scripts/mutants.py, beside this file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Machinery ----------------------------------------------------------------------------------------


def check_mutants(mutants: Sequence[Mutant], root: str = ROOT) -> List[str]:
    """Problems with the mutant table: names not unique, files missing,
    snippets not found exactly once, no-op edits, no tests."""
    problems, seen = [], set()
    for m in mutants:
        if m.name in seen:
            problems.append(f"{m.name}: duplicate name")
        seen.add(m.name)
        path = os.path.join(root, m.file)
        if not os.path.isfile(path):
            problems.append(f"{m.name}: no file {m.file}")
            continue
        text = open(path, encoding="utf-8").read()
        n = text.count(m.old)
        if n != 1:
            problems.append(f"{m.name}: the snippet occurs {n} times in {m.file} (must be exactly once): {m.old!r}")
        if m.old == m.new:
            problems.append(f"{m.name}: the replacement equals the snippet")
        if not m.tests:
            problems.append(f"{m.name}: no tests given")
        for t in m.tests + m.added:
            f = t.split("::")[0]
            if not os.path.isfile(os.path.join(root, f)):
                problems.append(f"{m.name}: test file {f} does not exist")
    return problems


def repo_files(root: str = ROOT) -> List[str]:
    """Tracked files and untracked files git does not ignore, as on disk."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout.decode()
    return sorted({f for f in out.split("\0") if f and os.path.isfile(os.path.join(root, f))})


def make_copy(root: str = ROOT) -> Tuple[str, str]:
    """``(tmp_base, copy_root)``: the repository's files under ``tmp_base/main``,
    with ``tmp_base/shared`` linked to ``root/../shared`` (external test data)."""
    base = tempfile.mkdtemp(prefix="mutation-check-")
    copy = os.path.join(base, os.path.basename(root.rstrip(os.sep)) or "repo")
    for f in repo_files(root):
        dst = os.path.join(copy, f)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(os.path.join(root, f), dst)
    shared = os.path.join(os.path.dirname(root), "shared")
    if os.path.isdir(shared):
        os.symlink(shared, os.path.join(base, "shared"))
    return base, copy


def _env(copy: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = copy + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no .pyc of a mutated module can outlive its mutant
    env["METARL_NO_COMPILE_CACHE"] = "1"
    return env


_FAIL_LINE = re.compile(r"^(FAILED|ERROR) (\S+)", re.M)


def run_tests(copy: str, tests: Sequence[str], timeout: float,
              mark: Optional[str] = None) -> Tuple[str, int, float, str, str]:
    """``(outcome, returncode, seconds, detail, message)`` of pytest on ``tests`` in ``copy``
    (``mark``: a ``-m`` expression instead of the default ``not slow and not gpu``)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-n0", *tests]
    if mark is not None:
        cmd += ["-m", mark]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=copy, env=_env(copy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this script started, and its children
        proc.communicate()
        return "timeout", -9, time.monotonic() - t0, f"killed after {timeout:.0f} s", ""
    except BaseException:  # Ctrl-C: the pytest session does not get it (its own session); end it too
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    dt = time.monotonic() - t0
    rc = proc.returncode
    fails = _FAIL_LINE.findall(out)
    tail = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] or [""]
    if rc == 0:
        return "survived", rc, dt, tail[0], ""
    # the first assertion lines pytest printed ("E   ..."), as the failure's message
    e_lines = [ln[1:].strip() for ln in out.splitlines() if ln.startswith("E ")]
    message = "\n".join(e_lines if len(e_lines) <= 6 else e_lines[:4] + ["..."] + e_lines[-2:])
    if rc in (1, 2):  # tests failed / errors (collection or setup): the suite reports the mutant
        return "caught", rc, dt, (fails[0][1] if fails else tail[0]), message
    return "error", rc, dt, tail[0], message  # 3 internal error, 4 usage (bad path), 5 no tests collected


def run_mutant(m: Mutant, copy: str, timeout: float, before: bool = False,
               tests: Optional[Sequence[str]] = None, mark: Optional[str] = None) -> Dict:
    dst = os.path.join(copy, m.file)  # the copy's own snapshot: edits made meanwhile in ``root`` do not leak in
    original = open(dst, encoding="utf-8").read()
    if original.count(m.old) != 1:
        raise SystemExit(f"error: mutant {m.name}: its snippet occurs {original.count(m.old)} times in {m.file}")
    try:
        with open(dst, "w", encoding="utf-8") as f:
            f.write(original.replace(m.old, m.new, 1))
        targets = tuple(tests) if tests else m.targets(before)
        outcome, rc, dt, detail, message = run_tests(copy, targets, timeout, mark)
    finally:
        with open(dst, "w", encoding="utf-8") as f:
            f.write(original)
    return dict(name=m.name, file=m.file, why=m.why, tests=list(targets), outcome=outcome, returncode=rc,
                seconds=round(dt, 1), detail=detail, message=message)


def table(results: Sequence[Dict]) -> str:
    w = max([len(r["name"]) for r in results] + [6])
    lines = [f"{'mutant':<{w}}  {'file':<28}  {'outcome':<8}  {'s':>5}  detail", "-" * (w + 60)]
    for r in results:
        lines.append(f"{r['name']:<{w}}  {r['file']:<28}  {r['outcome']:<8}  {r['seconds']:5.0f}  {r['detail'][:90]}")
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("caught", "survived", "timeout", "error")}
    lines.append(f"{len(results)} mutants: {counts['caught']} caught, {counts['survived']} survived, "
                 f"{counts['timeout']} timeout, {counts['error']} error")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[],
                   help="run only this mutant (repeat, or comma-separate, for several)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--check", action="store_true", help="only check the mutant table (snippets unique, files exist)")
    p.add_argument("--out", default=None, help="write the results as JSON here (e.g. docs/mutation_check.json)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per mutant (default 240)")
    p.add_argument("--before", action="store_true",
                   help="only the tests the suite had before the tests added for this check (the 'before' figure)")
    p.add_argument("--tests", action="append", default=[],
                   help="run these test targets instead of the mutants' own (repeat or comma-separate); to see "
                        "which tests catch a mutant")
    p.add_argument("--mark", default=None,
                   help="a pytest -m expression instead of the default 'not slow and not gpu' (e.g. slow)")
    p.add_argument("--show", action="store_true", help="print the first assertion lines of each caught mutant")
    p.add_argument("--baseline", action="store_true",
                   help="first run every selected mutant's tests on the unmutated copy (they must pass)")
    args = p.parse_args(argv)

    problems = check_mutants(MUTANTS)
    if problems:
        print("error: the mutant table is broken:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    only = [n.strip() for o in args.only for n in o.split(",") if n.strip()]
    names = {m.name for m in MUTANTS}
    unknown = [n for n in only if n not in names]
    if unknown:
        print(f"error: unknown mutant(s) {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not only or m.name in only]
    if args.list:
        for m in chosen:
            print(f"{m.name:<36} {m.file:<28} {m.why}")
            print(f"{'':<36} tests: {' '.join(m.tests)}")
            if m.added:
                print(f"{'':<36} added: {' '.join(m.added)}")
        print(f"{len(chosen)} mutants")
        return 0
    if args.check:
        print(f"ok: {len(MUTANTS)} mutants, every snippet occurs exactly once")
        return 0

    override = [t.strip() for o in args.tests for t in o.split(",") if t.strip()]
    base, copy = make_copy(ROOT)
    results = []
    try:
        if args.baseline:
            targets = override or sorted({t for m in chosen for t in m.targets(args.before)})
            print(f"baseline: {len(targets)} targets on the unmutated copy ...", flush=True)
            outcome, rc, dt, detail, _ = run_tests(copy, targets, args.timeout * 4, args.mark)
            print(f"baseline: {'ok' if outcome == 'survived' else outcome} ({dt:.0f} s) {detail}", flush=True)
            if outcome != "survived":
                print("error: the tests fail without any mutant; fix that first", file=sys.stderr)
                return 1
        for i, m in enumerate(chosen, 1):
            print(f"[{i}/{len(chosen)}] {m.name} ({m.file}) ...", end=" ", flush=True)
            r = run_mutant(m, copy, args.timeout, args.before, override, args.mark)
            results.append(r)
            print(f"{r['outcome']} in {r['seconds']:.0f} s  {r['detail'][:100]}", flush=True)
            if args.show and r["message"]:
                print("    " + r["message"].replace("\n", "\n    ")[:1500], flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(table(results))
    if args.out:
        counts = {k: sum(r["outcome"] == k for r in results) for k in ("caught", "survived", "timeout", "error")}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(before=bool(args.before), total=len(results), **counts, results=results), f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
