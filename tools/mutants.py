"""Mutation check: plant named, realistic bugs in a copy of the package and see which tests notice.

Not part of CI: the team runs it by hand after changing the core or its tests (docs/contributing.md).
Each mutant replaces one exact source snippet, which must occur exactly once in its file (so
the list cannot rot silently when the code changes), in a temporary copy of the repository,
then runs the test selection that should catch it with ``PYTHONPATH`` pointing at the copy.
A mutant is *killed* when that run fails (or times out), *survived* when it passes. A mutant
listed with an ``equivalent`` reason is still run and reported, but not counted in the score.

Usage (from the repository root)::

    .venv/bin/python tools/mutants.py                 # every mutant, with a baseline run first
    .venv/bin/python tools/mutants.py --list          # names, modules, selections
    .venv/bin/python tools/mutants.py --only reducer_no_divide clip_no_epsilon
    .venv/bin/python tools/mutants.py --module reducer.py --no-baseline --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from mutant_list import MUTANTS, SELECTIONS, Mutant

ROOT = Path(__file__).resolve().parent.parent
_IGNORED = (".git", ".venv", ".cache", "site", "outputs", "__pycache__", "*.egg-info", ".pytest_cache",
            ".hypothesis", ".issue.txt")


@dataclass(frozen=True)
class Outcome:
    """What one run gave: ``status`` is killed, survived, timeout (counts as killed) or baseline."""

    name: str
    status: str
    seconds: float
    detail: str


def check_snippets(mutants: Sequence[Mutant], root: Path = ROOT) -> None:
    """Refuse the whole list if any snippet is not found exactly once, or names are not unique.

    Raises:
        SystemExit: naming every mutant that does not apply.
    """
    problems = []
    names = [m.name for m in mutants]
    problems += [f"mutant name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for m in mutants:
        path = root / m.path
        if not path.exists():
            problems.append(f"{m.name}: {m.path} does not exist")
            continue
        count = path.read_text().count(m.snippet)
        if count != 1:
            problems.append(f"{m.name}: its snippet occurs {count} times in {m.path}, it must occur exactly once")
        if m.snippet == m.replacement:
            problems.append(f"{m.name}: the replacement equals the snippet")
        unknown = [s for s in m.selections if s not in SELECTIONS]
        if unknown:
            problems.append(f"{m.name}: unknown test selection(s) {unknown}")
    if problems:
        raise SystemExit("mutant list does not apply to this tree:\n  " + "\n  ".join(problems))


def make_copy(dest: Path) -> Path:
    """Copy the repository (no .git, no venv, no caches) to ``dest/repo``."""
    target = dest / "repo"
    shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(*_IGNORED), symlinks=True)
    return target


def _pytest_args(selections: Sequence[str]) -> list[str]:
    """One pytest command line for several selections.

    A selection item is a test file, optionally followed by `` -k <expression>``; several
    items become one run whose ``-k`` keeps each expression to its own file.
    """
    paths, keywords, filtered = [], [], False
    for name in selections:
        for item in SELECTIONS[name]:
            path, _, keyword = item.partition(" -k ")
            if path not in paths:
                paths.append(path)
            module = Path(path).name  # pytest matches -k against the module's file name too
            keywords.append(f"({module} and ({keyword}))" if keyword else module)
            filtered |= bool(keyword)
    return paths + (["-k", " or ".join(keywords)] if filtered else [])


def run_tests(copy: Path, selections: Sequence[str], timeout_s: float, *,
              stop_at_first: bool) -> tuple[str, float, str]:
    """Run the selections' tests in ``copy``; returns (passed/failed/timeout, seconds, last lines)."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
           *(["-x"] if stop_at_first else []), *_pytest_args(selections)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the test run and the rank processes it forked
        out, _ = proc.communicate()
        return "timeout", time.monotonic() - start, out[-400:]
    tail = "\n".join(line for line in out.splitlines()[-3:] if line.strip())
    return ("passed" if proc.returncode == 0 else "failed"), time.monotonic() - start, tail


def run_mutant(copy: Path, m: Mutant, timeout_s: float) -> Outcome:
    """Apply ``m`` in ``copy``, run its selections, restore the file whatever happens."""
    path = copy / m.path
    original = path.read_text()
    path.write_text(original.replace(m.snippet, m.replacement, 1))
    try:
        result, seconds, tail = run_tests(copy, m.selections, timeout_s, stop_at_first=True)
    finally:
        path.write_text(original)
    status = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[result]
    return Outcome(m.name, status, seconds, tail)


def score(outcomes: Sequence[Outcome], mutants: Sequence[Mutant]) -> tuple[int, int]:
    """(killed, counted): equivalent mutants are not counted; timeouts count as killed."""
    equivalent = {m.name for m in mutants if m.equivalent}
    counted = [o for o in outcomes if o.name not in equivalent and o.status != "baseline"]
    return sum(o.status in ("killed", "timeout") for o in counted), len(counted)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", nargs="*", default=[], help="run only these mutants (names)")
    parser.add_argument("--module", nargs="*", default=[], help="run only mutants of these files (e.g. reducer.py)")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per test run (default 420)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip checking that the selections pass on the unmutated copy")
    parser.add_argument("--json", type=Path, help="also write the outcomes to this file")
    args = parser.parse_args(argv)
    check_snippets(MUTANTS)
    chosen = [m for m in MUTANTS if (not args.only or m.name in args.only)
              and (not args.module or Path(m.path).name in args.module)]
    unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
    if unknown:
        raise SystemExit(f"unknown mutant(s) {unknown}; --list shows them")
    if args.list:
        for m in chosen:
            tag = f"  [equivalent: {m.equivalent}]" if m.equivalent else ""
            print(f"{m.name:40s} {m.path:42s} {','.join(m.selections)}{tag}")
        print(f"{len(chosen)} mutants")
        return 0
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="sfa_mutants_") as tmp:
        copy = make_copy(Path(tmp))
        if not args.no_baseline:
            selections = sorted({s for m in chosen for s in m.selections})
            result, seconds, tail = run_tests(copy, selections, args.timeout * 3, stop_at_first=False)
            print(f"baseline ({len(selections)} selections): {result} in {seconds:.0f} s", flush=True)
            if result != "passed":
                print(tail)
                raise SystemExit("the selected tests fail without any mutant: fix them first")
        for i, m in enumerate(chosen, 1):
            o = run_mutant(copy, m, args.timeout)
            outcomes.append(o)
            note = f" (equivalent: {m.equivalent})" if m.equivalent else ""
            print(f"[{i}/{len(chosen)}] {o.status:8s} {o.seconds:6.1f} s  {m.name}{note}", flush=True)
            if o.status == "survived" and not m.equivalent:
                print(f"    {m.path}: {m.description}")
    killed, counted = score(outcomes, chosen)
    survivors = [o.name for o in outcomes if o.status == "survived"]
    print(f"\nmutation score: {killed}/{counted} killed"
          + (f" ({100 * killed / counted:.0f}%)" if counted else "")
          + f"; survivors: {survivors or 'none'}; {sum(o.seconds for o in outcomes):.0f} s of test runs")
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    return 0 if killed == counted else 1


if __name__ == "__main__":
    sys.exit(main())
