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
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from gqa import ForkError
from gqa.bases import Base, BUILD, ROOT
from gqa.fork import (
    UPSTREAM_EDITS,
    archive,
    git,
    materialize,
    materialize_release_path,
    read_series,
    upstream_release_commit,
)
from gqa.install import install, install_torch, installed_versions, version_tuple
from gqa.release import unpack, verified_sdist

# pytest's exit status where no test matched its arguments
NO_TESTS = 5
STARTED = time.monotonic()


def parallel_options(pytest_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """pytest-xdist's options for this machine (unless the caller chose), and
    the environment that keeps its workers from oversubscribing the cores:
    one OpenMP thread share and one inductor compile thread each. `install`
    puts pytest-xdist into every base's environment."""
    if "-n" in pytest_args or any(a.startswith(("-n=", "--numprocesses")) for a in pytest_args):
        return [], {}
    cores = os.cpu_count() or 1
    workers = max(1, min(cores, 16))
    return ["-n", str(workers), "--dist", "loadgroup"], {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cores // workers))),
        "TORCHINDUCTOR_COMPILE_THREADS": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "1"),
    }


def pytest(base: Base, folder: Path, args: list[str], env: dict | None = None) -> int:
    """pytest in the base's environment, from `folder`: its exit status."""
    options, parallel_env = parallel_options(args)
    return subprocess.run(
        [str(base.python), "-m", "pytest", "-ra", *options, *args],
        cwd=folder, env={**os.environ, **parallel_env, **(env or {})},
    ).returncode


def commit_tests(fork: Path, commits: list[str]) -> dict[str, list[str]]:
    """{commit: the test files it adds or changes}, of the given commits."""
    return {
        commit: [
            path for path in git(fork, "diff-tree", "--no-commit-id", "--name-only", "-r", "--diff-filter=AM", commit).split()
            if re.fullmatch(r"tests/.*test_[^/]*\.py", path)
        ]
        for commit in commits
    }


def run_at_commit(base: Base, fork: Path, commit: str, tests: list[str], pytest_args: list[str]) -> tuple[int, str]:
    """pytest over `tests` in a checkout of `commit`, in the base's
    environment: its exit status and output."""
    with tempfile.TemporaryDirectory() as tmp:
        archive(fork, commit, Path(tmp))
        proc = subprocess.run(
            [str(base.python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args, *tests],
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
    todo = {commit: tests for commit, tests in commit_tests(fork, commits).items() if tests}
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
        results = dict(zip(todo, pool.map(lambda c: run_at_commit(base, fork, c, todo[c], pytest_args), todo)))
    failed, report = [], []
    for commit, (code, output) in results.items():
        subject = git(fork, "log", "-1", "--format=%s", commit).strip()
        summary = (output.strip().splitlines() or ["no output"])[-1]
        report.append(f"--- {subject} ({', '.join(Path(t).name for t in todo[commit])}): {summary}")
        if code not in (0, NO_TESTS):
            report.append(output)
            failed.append(subject)
    return failed, "\n".join(report)


class Outcome(NamedTuple):
    # passed, failure, error or skipped
    kind: str
    # the failures' and errors' messages and tracebacks
    report: str


def junit_outcomes(report: Path) -> dict[str, Outcome]:
    """{test id (classname::name): its outcome} from a pytest junit report."""
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        problems = [p for p in case if p.tag in ("failure", "error")]
        kinds = [p.tag for p in case if p.tag in ("failure", "error", "skipped")]
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = Outcome(
            kinds[0] if kinds else "passed",
            "\n".join(f"{p.tag}: {p.get('message')}\n{p.text}" for p in problems),
        )
    return outcomes


def upstream_test_edits(base: Base) -> list[Path]:
    """The series' edits to upstream's tests, in the series' order."""
    return [
        edits for name in read_series(base)
        if (edits := base.patches / UPSTREAM_EDITS / name).is_file()
    ]


def upstream_test_changes(base: Base) -> dict[str, str]:
    """{upstream test id: why the series changes its outcome}, from the series'
    upstream-test-changes file."""
    path = base.patches / "upstream-test-changes"
    lines = path.read_text().splitlines() if path.exists() else []
    return dict(
        (part.strip() for part in line.split("|", 1)) for line in lines if line.strip() and not line.startswith("#")
    )


def compare_upstream_tests(base: Base, upstream: Path, sdist: Path | None) -> list[str]:
    """Runs upstream's own tests of the models (tests/unit_tests at the release
    commit of the clone `upstream`) on the pristine release and on the fork;
    the differences that the series does not declare in upstream-test-changes,
    and the declared ones that did not happen."""
    commit = upstream_release_commit(base, upstream)
    with tempfile.TemporaryDirectory() as tmp:
        unpack(base, verified_sdist(base, sdist), Path(tmp, "pristine"))
        sides = {"pristine": Path(tmp, "pristine"), "fork": base.fork}
        outcomes = {}
        for side, code in sides.items():
            # upstream's tests as the release has them, and on the fork as the series edits them
            suite = archive(upstream, commit, Path(tmp, f"{side}-tests"), "tests/unit_tests")
            if side == "fork":
                for edits in upstream_test_edits(base):
                    proc = subprocess.run(["git", "apply", str(edits)], cwd=suite, capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise ForkError(f"{edits} does not apply to upstream's tests at {base.tag} ({proc.stderr.strip()}); mend it")
            tests = sorted(
                str(path.relative_to(suite)) for path in Path(suite, "tests", "unit_tests").glob("test_*.py")
                if "torchtitan.models" in path.read_text()
            )
            report = Path(tmp, f"{side}.xml")
            print(f"--- upstream's tests of the models on the {side} release ({len(tests)} files)", flush=True)
            pytest(base, suite, ["-q", "--tb=no", "-p", "no:cacheprovider", f"--junitxml={report}", *tests], {"PYTHONPATH": str(code)})
            outcomes[side] = {test_id: o.kind for test_id, o in junit_outcomes(report).items()}
    declared = upstream_test_changes(base)
    changed = {
        test_id: (outcomes["pristine"].get(test_id), outcomes["fork"].get(test_id))
        for test_id in outcomes["pristine"].keys() | outcomes["fork"].keys()
        if outcomes["pristine"].get(test_id) != outcomes["fork"].get(test_id)
    }
    for test_id, (before, after) in sorted(changed.items()):
        print(f"{test_id}: {before} on the release, {after} on the fork; {declared.get(test_id, 'NOT DECLARED')}")
    problems = [f"{test_id} ({before} -> {after}) is not in upstream-test-changes" for test_id, (before, after) in changed.items() if test_id not in declared]
    problems += [f"{test_id} is in upstream-test-changes but did not change" for test_id in declared if test_id not in changed]
    passed = {side: sum(v == "passed" for v in outcomes[side].values()) for side in outcomes}
    print(f"upstream's tests: {passed['pristine']} pass on the release, {passed['fork']} on the fork, "
          f"{len(changed)} changed", flush=True)
    return problems


def fork_report(base: Base, head: str) -> Path:
    """The junit report of the fork's tests at commit `head`, kept for the
    mutation tests, which need those tests' outcomes on the fork as it is."""
    return BUILD / "reports" / f"fork-tests-{base.version}-{head}.xml"


def progress(step: int, steps: int, message: str) -> None:
    """One line per part of a run, with the minutes since the tool started."""
    print(f"==> [{step}/{steps}] {message} (at {(time.monotonic() - STARTED) / 60:.1f} min)", flush=True)


def unmet_requirement(base: Base) -> str | None:
    """Why the base's environment cannot run its fork's tests, if it cannot."""
    if sys.version_info[:2] < base.min_python:
        return f"torchtitan {base.version} needs Python >= {'.'.join(map(str, base.min_python))}"
    if not base.python.exists():
        return f"{base.venv} is not made"
    versions = installed_versions(base, ["torch", "pytest"])
    if versions["torch"] is None or version_tuple(versions["torch"]) < base.min_torch:
        return f"torchtitan {base.version} needs torch >= {'.'.join(map(str, base.min_torch))}, and {base.venv} has {versions['torch'] or 'none'}"
    if versions["pytest"] is None:
        return f"{base.venv} has no pytest"
    return None


def run_tests(bases: list[Base], sdist: Path | None, pytest_args: list[str], upstream: Path | None = None) -> str:
    """Materializes and installs each base's fork, runs each fork's tests (and,
    with an upstream clone, upstream's tests of the models on the release and
    on the fork), then this repository's (where the default base is among
    them) while each commit's own tests run at that commit, each in its base's
    environment. Where pip may not reach an index (PIP_NO_INDEX, as on a GPU
    machine without network), a base after the first whose torch is not
    installed is skipped with the reason."""
    print(
        f"test: for {', '.join(b.version for b in bases)}: materializes and installs the fork and runs its "
        f"tests, then this repository's tests while each commit's own tests run at that commit (this "
        f"took 6.3 minutes on one H100, and 26.5 in CI's .ci/run on a fresh 2-core CPU machine, installs "
        f"included, 2026-12-06); GPU tests run where CUDA is, "
        f"the rest skip with their reason",
        flush=True,
    )
    steps = 2 * len(bases) + 2
    step = iter(range(1, steps + 1))
    tested, skipped = [], []
    for base in bases:
        progress(next(step), steps, f"{base.version}: materialize {base.fork} and install into {base.venv}")
        try:
            install_torch(base)
        except ForkError as error:
            if not tested or not os.environ.get("PIP_NO_INDEX"):
                raise
            print(f"==> skipping torchtitan {base.version}'s series, as pip may not reach an index: {error}", flush=True)
            skipped.append(base.version)
            continue
        print(materialize(base, base.fork, None, sdist, False))
        if base.release_path is not None:
            print(materialize_release_path(base, sdist))
        print(install(base))
        tested.append(base)
    exits = {}
    for base in tested:
        progress(next(step), steps, f"{base.version}: the fork's tests, from {base.fork}")
        junit = fork_report(base, git(base.fork, "rev-parse", "HEAD").strip())
        junit.parent.mkdir(parents=True, exist_ok=True)
        env = {} if base.installed else {"PYTHONPATH": str(base.fork)}
        exits[f"torchtitan {base.version}'s fork tests"] = pytest(base, base.fork, [f"--junitxml={junit}", *pytest_args], env)
    upstream_problems = [
        problem for base in tested if upstream is not None
        for problem in compare_upstream_tests(base, upstream, sdist)
    ]
    # each commit's own tests and this repository's need nothing of each other
    with ThreadPoolExecutor(max_workers=1) as pool:
        progress(next(step), steps, "each commit's own tests, at that commit, in the background")
        commit_runs = pool.submit(
            lambda: [each_commit_passes_its_tests(base, base.fork, pytest_args, True) for base in tested]
        )
        installed = next((base for base in tested if base.installed), None)
        if installed is not None:
            progress(next(step), steps, f"the tooling and training tests, from {ROOT}, in {installed.venv}")
            exits["the tooling and training tests"] = pytest(installed, ROOT, pytest_args)
        failed_commits = []
        for failed, report in commit_runs.result():
            print(f"each commit's own tests, at that commit:\n{report}", flush=True)
            failed_commits += failed
    failed = [f"{name} (pytest exit {code})" for name, code in exits.items() if code not in (0, NO_TESTS)]
    failed += [f"the tests of {subject!r} at that commit" for subject in failed_commits]
    failed += upstream_problems
    if failed or set(exits.values()) == {NO_TESTS}:
        raise ForkError(f"tests failed: {', '.join(failed) or 'no test matched'}; see the reports above")
    skips = f" (skipped {', '.join(skipped)}: its torch could not be installed offline, see above)" if skipped else ""
    return f"tests passed for torchtitan {', '.join(b.version for b in tested)}{skips}"
