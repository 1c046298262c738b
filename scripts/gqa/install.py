"""Installs torch (kept where suitable), triton, the fork and the test tools
into the Python that runs the tool."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from gqa import ForkError
from gqa.bases import Base, ROOT

# Pinned: a bare "torch" would pull the newest release's CUDA wheels.
TORCH_SPEC = os.environ.get("GQA_FORK_TORCH", "torch==2.13.0")
TEST_TOOLS = ("pytest", "pytest-xdist", "matplotlib")


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise ForkError(f"pip {' '.join(args)} failed; see pip's output above")


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:2])


def release_dependencies(base: Base) -> list[str]:
    """The fork's declared dependencies, torch left out: it is installed first."""
    import tomllib

    declared = tomllib.loads((base.fork / "pyproject.toml").read_text())["project"]["dependencies"]
    return [spec for spec in declared if re.split(r"[\s<>=!~;\[]", spec)[0].lower() != "torch"]


def install(base: Base) -> str:
    """Install torch (kept if suitable), triton, the fork (editable where the
    base is installed, else its dependencies) and the test tools."""
    if sys.version_info[:2] < base.min_python:
        wanted_python = ".".join(map(str, base.min_python))
        raise ForkError(
            f"torchtitan {base.version} needs Python >= {wanted_python}, and this is "
            f"{sys.version.split()[0]}; run the tool with a newer Python"
        )
    if not base.fork.exists():
        raise ForkError(f"{base.fork} does not exist; run 'materialize' first")
    torch_version = installed_version("torch")
    if torch_version is None or version_tuple(torch_version) < base.min_torch:
        pip("install", *shlex.split(TORCH_SPEC))
        torch_version = installed_version("torch")
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp, "constraints.txt")
        constraints.write_text(f"torch=={torch_version}\n")
        wanted = [] if installed_version("triton") else ["triton"]
        if not base.installed:
            wanted += release_dependencies(base)
        elif not fork_imports_from_root(base):
            # compat: a path entry for the checkout, which outranks the checkout
            # folder ./torchtitan that Python finds first from the repository root
            wanted += ["--config-settings", "editable_mode=compat", "-e", str(base.fork)]
        wanted += [tool for tool in TEST_TOOLS if not installed_version(tool)]
        if wanted:
            pip("install", "--quiet", "-c", str(constraints), *wanted)
    if not base.installed:
        return f"installed: torch {torch_version} and torchtitan {base.version}'s dependencies (the fork itself runs from {base.fork})"
    if not fork_imports_from_root(base):
        raise ForkError(f"from {ROOT}, 'import torchtitan' does not load {base.fork}; see pip's output above")
    return f"installed: torch {torch_version}, torchtitan from {base.fork}"


def fork_imports_from_root(base: Base) -> bool:
    """Whether `import torchtitan`, run from the repository root as the configs'
    commands are, loads the fork's package rather than the checkout folder."""
    proc = subprocess.run(
        [sys.executable, "-c", "import torchtitan; print(torchtitan.__file__)"],
        cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True, text=True,
    )
    return proc.stdout.strip() == str(base.fork / "torchtitan" / "__init__.py")
