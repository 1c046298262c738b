import importlib.util
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from gqa import bases  # noqa: E402


@pytest.fixture
def base(tmp_path):
    """The default base with a copy of its series, and its fork and release
    path under tmp_path (the verified sdist is shared)."""
    default = bases.BASES[bases.DEFAULT]
    patches = tmp_path / "patches"
    shutil.copytree(default.patches, patches)
    return replace(
        default,
        patches=patches,
        fork=tmp_path / "torchtitan",
        release_path=tmp_path / "build" / default.release_path.name,
    )


@pytest.fixture(scope="session")
def cli():
    """The CLI module, scripts/gqa_fork.py."""
    spec = importlib.util.spec_from_file_location("gqa_fork", ROOT / "scripts" / "gqa_fork.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
