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


def run_tests(base: Base, sdist: Path | None, pytest_args: list[str]) -> str:
    print(materialize(base, base.fork, None, sdist, False))
    print(materialize_release_path(base, sdist))
    print(install(base))
    exits = {
        name: subprocess.run([sys.executable, "-m", "pytest", "-ra", *pytest_args], cwd=folder).returncode
        for name, folder in (("the fork's tests", base.fork), ("the tooling and training tests", ROOT))
    }
    # 5: no test matched the pytest arguments in that folder
    failed = [f"{name} (pytest exit {code})" for name, code in exits.items() if code not in (0, 5)]
    if failed or set(exits.values()) == {5}:
        raise ForkError(f"tests failed: {', '.join(failed) or 'no test matched'}; see the reports above")
    return "tests passed"
