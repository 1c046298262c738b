"""The test suites that `test` runs: the fork's own tests from the fork's root,
as upstream runs them, then this repository's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gqa import ForkError
from gqa.bases import Base, ROOT
from gqa.fork import materialize, materialize_release_path
from gqa.install import install


def suites(base: Base) -> list[tuple[str, Path, str]]:
    """(name, folder, how long it takes on a 2-core CPU machine) of each suite."""
    return [
        ("the fork's tests", base.fork, "about 3 minutes"),
        ("the tooling and training tests", ROOT, "about 6 minutes"),
    ]


def progress(step: int, steps: int, message: str) -> None:
    print(f"==> [{step}/{steps}] {message}", flush=True)


def run_tests(base: Base, sdist: Path | None, pytest_args: list[str]) -> str:
    runs = suites(base)
    steps = 3 + len(runs)
    print(
        f"test: materializes the {base.version} fork and its release path, installs, then runs "
        + ", then ".join(f"{name} ({duration} on 2 CPU cores)" for name, _, duration in runs)
        + "; GPU tests run where CUDA is, the rest skip with their reason",
        flush=True,
    )
    progress(1, steps, f"materialize {base.fork}")
    print(materialize(base, base.fork, None, sdist, False))
    progress(2, steps, f"materialize the release path {base.release_path}")
    print(materialize_release_path(base, sdist))
    progress(3, steps, "install")
    print(install(base))
    exits = {}
    for step, (name, folder, duration) in enumerate(runs, start=4):
        progress(step, steps, f"{name}, from {folder} ({duration} on 2 CPU cores)")
        exits[name] = subprocess.run([sys.executable, "-m", "pytest", "-ra", *pytest_args], cwd=folder).returncode
    # 5: no test matched the pytest arguments in that folder
    failed = [f"{name} (pytest exit {code})" for name, code in exits.items() if code not in (0, 5)]
    if failed or set(exits.values()) == {5}:
        raise ForkError(f"tests failed: {', '.join(failed) or 'no test matched'}; see the reports above")
    return "tests passed"
