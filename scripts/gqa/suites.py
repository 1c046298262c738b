"""The test suites that `test` runs: the fork's own tests from the fork's root,
as upstream runs them, each commit's own tests at that commit, and this
repository's tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gqa import ForkError
from gqa.bases import Base, BUILD, ROOT
from gqa.fork import git, materialize, materialize_release_path
from gqa.install import install, installed_version

# pytest's exit status where no test matched its arguments
NO_TESTS = 5
STARTED = time.monotonic()


def parallel_options(pytest_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """pytest-xdist's options for this machine (unless the caller chose), and
    the environment that keeps its workers from oversubscribing the cores:
    one OpenMP thread share and one inductor compile thread each."""
    if "-n" in pytest_args or any(a.startswith(("-n=", "--numprocesses")) for a in pytest_args):
        return [], {}
    if installed_version("pytest-xdist") is None:
        return [], {}
    cores = os.cpu_count() or 1
    workers = max(1, min(cores, 16))
    return ["-n", str(workers), "--dist", "loadgroup"], {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cores // workers))),
        "TORCHINDUCTOR_COMPILE_THREADS": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "1"),
    }


def pytest(folder: Path, args: list[str], env: dict | None = None) -> int:
    options, parallel_env = parallel_options(args)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-ra", *options, *args],
        cwd=folder, env={**os.environ, **parallel_env, **(env or {})},
    ).returncode


def commit_tests(fork: Path, base: Base, commits: list[str]) -> dict[str, list[str]]:
    """{commit: the test files it adds or changes}, of the given commits."""
    return {
        commit: [
            path for path in git(fork, "diff-tree", "--no-commit-id", "--name-only", "-r", "--diff-filter=AM", commit).split()
            if re.fullmatch(r"tests/.*test_[^/]*\.py", path)
        ]
        for commit in commits
    }


def run_at_commit(fork: Path, commit: str, tests: list[str], pytest_args: list[str]) -> tuple[int, str]:
    """pytest over `tests` in a checkout of `commit`: its exit status and output."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", fork, "archive", commit], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args, *tests],
            cwd=tmp, env={**os.environ, "PYTHONPATH": tmp, "OMP_NUM_THREADS": "1"},
            capture_output=True, text=True,
        )
    return proc.returncode, proc.stdout + proc.stderr


def each_commit_passes_its_tests(
    base: Base, fork: Path, pytest_args: list[str], skip_last: bool
) -> tuple[list[str], str]:
    """Runs the tests each commit of the fork adds or changes at that commit,
    from a checkout of it, so that every commit stands on its own; several
    commits at once, one per core. Returns the commits whose tests failed and
    a report: a line per commit, and the output of those that failed.
    skip_last: the last commit's tests are the fork's own, run elsewhere."""
    commits = git(fork, "rev-list", "--reverse", f"{base.tag}..HEAD").split()
    if skip_last:
        commits = commits[:-1]
    todo = {commit: tests for commit, tests in commit_tests(fork, base, commits).items() if tests}
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
        results = dict(zip(todo, pool.map(lambda c: run_at_commit(fork, c, todo[c], pytest_args), todo)))
    failed, report = [], []
    for commit, (code, output) in results.items():
        subject = git(fork, "log", "-1", "--format=%s", commit).strip()
        summary = (output.strip().splitlines() or ["no output"])[-1]
        report.append(f"--- {subject} ({', '.join(Path(t).name for t in todo[commit])}): {summary}")
        if code not in (0, NO_TESTS):
            report.append(output)
            failed.append(subject)
    return failed, "\n".join(report)


def fork_report(base: Base, head: str) -> Path:
    """The junit report of the fork's tests at commit `head`, kept for the
    mutation tests, which need those tests' outcomes on the fork as it is."""
    return BUILD / "reports" / f"fork-tests-{base.version}-{head}.xml"


def progress(step: int, steps: int, message: str) -> None:
    """One line per part of a run, with the minutes since the tool started."""
    print(f"==> [{step}/{steps}] {message} (at {(time.monotonic() - STARTED) / 60:.1f} min)", flush=True)


def run_tests(base: Base, sdist: Path | None, pytest_args: list[str]) -> str:
    print(
        f"test: materializes the {base.version} fork and its release path and installs them, then "
        f"runs the fork's tests (about 2 minutes on 2 CPU cores), then this repository's tests "
        f"(about 6 minutes) while each commit's own tests run at that commit; GPU tests run "
        f"where CUDA is, the rest skip with their reason",
        flush=True,
    )
    steps = 6
    progress(1, steps, f"materialize {base.fork}")
    print(materialize(base, base.fork, None, sdist, False))
    progress(2, steps, f"materialize the release path {base.release_path}")
    print(materialize_release_path(base, sdist))
    progress(3, steps, "install")
    print(install(base))
    progress(4, steps, f"the fork's tests, from {base.fork}")
    junit = fork_report(base, git(base.fork, "rev-parse", "HEAD").strip())
    junit.parent.mkdir(parents=True, exist_ok=True)
    exits = {"the fork's tests": pytest(base.fork, [f"--junitxml={junit}", *pytest_args])}
    # each commit's own tests and this repository's need nothing of each other
    with ThreadPoolExecutor(max_workers=1) as pool:
        progress(5, steps, "each commit's own tests, at that commit, in the background")
        commit_run = pool.submit(each_commit_passes_its_tests, base, base.fork, pytest_args, True)
        progress(6, steps, f"the tooling and training tests, from {ROOT}")
        exits["the tooling and training tests"] = pytest(ROOT, pytest_args)
        failed_commits, report = commit_run.result()
    print(f"each commit's own tests, at that commit:\n{report}", flush=True)
    failed = [f"{name} (pytest exit {code})" for name, code in exits.items() if code not in (0, NO_TESTS)]
    failed += [f"the tests of {subject!r} at that commit" for subject in failed_commits]
    if failed or set(exits.values()) == {NO_TESTS}:
        raise ForkError(f"tests failed: {', '.join(failed) or 'no test matched'}; see the reports above")
    return "tests passed"
