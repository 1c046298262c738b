import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_tool():
    spec = importlib.util.spec_from_file_location("gqa_fork", ROOT / "scripts" / "gqa_fork.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gqa_fork"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tool(tmp_path, monkeypatch):
    """The CLI module, working on a copy of patches/ and a fork under tmp_path."""
    module = load_tool()
    patches = tmp_path / "patches"
    shutil.copytree(module.PATCHES, patches)
    monkeypatch.setattr(module, "PATCHES", patches)
    monkeypatch.setattr(module, "SERIES", patches / "series")
    monkeypatch.setattr(module, "FORK", tmp_path / "torchtitan")
    monkeypatch.setattr(module, "BASELINE", tmp_path / "build" / "torchtitan-0.2.1-compat")
    return module


@pytest.fixture(scope="session")
def cli():
    """The CLI module as it is, on the real fork and the 0.2.1 path beside it."""
    return load_tool()
