import importlib.util
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from gqa import bases  # noqa: E402


def base_in(tmp_path, version):
    """The base of `version` with a copy of its series, and its fork, release
    path and environment under tmp_path (the verified sdist is shared)."""
    real = bases.BASES[version]
    patches = tmp_path / "patches"
    shutil.copytree(real.patches, patches)
    release_path = real.release_path and tmp_path / "build" / real.release_path.name
    return replace(
        real, patches=patches, fork=tmp_path / real.fork.name, release_path=release_path,
        venv=tmp_path / "build" / real.venv.name,
    )


@pytest.fixture
def base(tmp_path):
    """The default base, under tmp_path."""
    return base_in(tmp_path, bases.DEFAULT)


@pytest.fixture
def other_base(tmp_path):
    """The first base that is not the default (0.3.0), under tmp_path."""
    return base_in(tmp_path, next(v for v in bases.BASES if v != bases.DEFAULT))


def script_module(name):
    """scripts/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def cli():
    """The CLI module, scripts/gqa_fork.py."""
    return script_module("gqa_fork")


@pytest.fixture(scope="session")
def benchmark_script():
    """scripts/benchmark.py as a module."""
    return script_module("benchmark")


@pytest.fixture
def stand_in_repository(tmp_path):
    """A clone-like copy of this repository under tmp_path: its scripts and
    series (committed), and the verified sdists in build/, for running the CLI
    without touching this repository; returns its root."""
    repository = tmp_path / "repository"
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("scripts", "patches"):
        shutil.copytree(ROOT / folder, repository / folder, ignore=ignore)
    shutil.copyfile(ROOT / ".gitignore", repository / ".gitignore")
    (repository / "build").mkdir()
    for base in bases.BASES.values():
        if base.sdist_cache.exists():
            (repository / "build" / base.sdist_name).symlink_to(base.sdist_cache)
    identity = ["-c", "user.name=Dev", "-c", "user.email=dev@example.com"]
    for args in (["init", "-q"], ["add", "-A"], [*identity, "commit", "-qm", "stand-in"]):
        subprocess.run(["git", *args], cwd=repository, check=True, capture_output=True)
    return repository
