"""Installs each base into a virtual environment of its own, made by the tool
(base.venv, under the git-ignored build/): torch, triton, the fork (editable)
or its release's dependencies, the base's test requirements and the test
tools. The environment also sees the packages of the Python that runs the
tool, so a suitable torch there is used; only what is missing or too old is
installed, into that environment alone."""

from __future__ import annotations

import json
import os
import re
import shlex
import site
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

from gqa import ForkError, last_line
from gqa.bases import Base, ROOT

TEST_TOOLS = ("pytest", "pytest-xdist", "matplotlib")
# In the environment's site-packages: adds the site-packages of the Python that
# made it, after its own (--system-site-packages does so only where that Python
# is not a virtual environment itself); written last, so it marks a whole one.
INHERITED_SITES = "gqa-fork-inherited-sites.pth"
# a name, extras, then version specifiers; anything else (markers) is left to pip
REQUIREMENT = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*((?:[<>=!~]=?\s*[\w.*+!-]+\s*,?\s*)*)")


def pip(base: Base, *args: str) -> None:
    cmd = [str(base.python), "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise ForkError(f"pip {' '.join(args)} failed in {base.venv}; see pip's output above")


def site_packages(base: Base) -> Path:
    return base.venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def make_environment(base: Base) -> None:
    """base.venv, unless there is a whole one: a virtual environment of this
    Python that sees this Python's packages after its own (pip included)."""
    inherited = site_packages(base) / INHERITED_SITES
    if inherited.exists():
        return
    print(f"making {base.venv}, the environment of torchtitan {base.version}", flush=True)
    venv.EnvBuilder(clear=True, symlinks=True, with_pip=False).create(base.venv)
    inherited.write_text("".join(f"import site; site.addsitedir({folder!r})\n" for folder in site.getsitepackages()))


def installed_versions(base: Base, names: list[str]) -> dict[str, str | None]:
    """{distribution: its version in the base's environment, or None}."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def version(name):\n"
        "    try:\n"
        "        return m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        "print(json.dumps({name: version(name) for name in sys.argv[1:]}))"
    )
    proc = subprocess.run(
        [str(base.python), "-c", code, *names], cwd=base.venv, capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    if proc.returncode != 0:
        raise ForkError(f"{base.python} does not run ({last_line(proc.stderr)}); move {base.venv} away and run 'install' again")
    return json.loads(proc.stdout)


def version_tuple(version: str) -> tuple[int, ...]:
    """The release numbers of a version: '2.14.1+cu130' -> (2, 14, 1)."""
    release = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(x) for x in release.group().split(".")) if release else ()


def satisfies(version: str, specifier: str) -> bool:
    """Whether `version` meets one specifier such as '>=3.6.0', '==0.2.*' or '~=1.4'."""
    operator, wanted = re.fullmatch(r"\s*([<>=!~]=?)\s*(\S+)\s*", specifier).groups()
    have = version_tuple(version)
    if wanted.endswith(".*"):
        prefix = version_tuple(wanted[:-2])
        return (have[: len(prefix)] == prefix) == (operator == "==")
    release = version_tuple(wanted)
    width = max(len(have), len(release))
    have, want = have + (0,) * (width - len(have)), release + (0,) * (width - len(release))
    match operator:
        case "==":
            return have == want
        case "!=":
            return have != want
        case ">=":
            return have >= want
        case "<=":
            return have <= want
        case ">":
            return have > want
        case "<":
            return have < want
        case "~=":
            return have >= want and have[: len(release) - 1] == release[:-1]
    return False


def unmet(requirements: list[str], versions: dict[str, str | None]) -> list[str]:
    """The requirements that the installed `versions` do not meet."""
    missing = []
    for requirement in requirements:
        parsed = REQUIREMENT.fullmatch(requirement.strip())
        if parsed is None:
            missing.append(requirement)
            continue
        name, specifiers = parsed.groups()
        version = versions.get(name)
        if version is None or not all(satisfies(version, s) for s in specifiers.split(",") if s.strip()):
            missing.append(requirement)
    return missing


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[,]", requirement.strip(), maxsplit=1)[0]


def release_dependencies(base: Base) -> list[str]:
    """The fork's declared dependencies, torch left out: it is installed first."""
    import tomllib

    declared = tomllib.loads((base.fork / "pyproject.toml").read_text())["project"]["dependencies"]
    return [spec for spec in declared if requirement_name(spec).lower() != "torch"]


def check_python(base: Base) -> None:
    if sys.version_info[:2] < base.min_python:
        wanted_python = ".".join(map(str, base.min_python))
        raise ForkError(
            f"torchtitan {base.version} needs Python >= {wanted_python}, and this is "
            f"{sys.version.split()[0]}; run the tool with a newer Python"
        )


def install_torch(base: Base) -> str:
    """Makes the base's environment and gives it a torch of at least
    base.min_torch (kept if it sees one); that torch's version."""
    check_python(base)
    make_environment(base)
    torch_version = installed_versions(base, ["torch"])["torch"]
    if torch_version is not None and version_tuple(torch_version) >= base.min_torch:
        return torch_version
    if installed_versions(base, ["pip"])["pip"] is None:
        raise ForkError(f"{sys.executable} has no pip, which installs into {base.venv}; run '{sys.executable} -m ensurepip' and run again")
    wanted = ".".join(map(str, base.min_torch))
    try:
        pip(base, "install", *shlex.split(base.torch))
    except ForkError:
        index = re.search(r"--(?:index-url|extra-index-url)[= ](\S+)", base.torch)
        fallback = (
            f"; where {index.group(1)} cannot be reached, unset GQA_FORK_TORCH to install PyPI's "
            f"torch==2.13.0 (its CUDA build, which runs on a CPU too), or install a torch wheel file "
            f"you have with '{base.python} -m pip install FILE'"
            if index else ""
        )
        raise ForkError(
            f"torchtitan {base.version} needs torch >= {wanted}, and pip could not install "
            f"'{base.torch}' into {base.venv} (see pip's output above){fallback}"
        ) from None
    torch_version = installed_versions(base, ["torch"])["torch"]
    if torch_version is None or version_tuple(torch_version) < base.min_torch:
        raise ForkError(f"'{base.torch}' gave torch {torch_version}, and torchtitan {base.version} needs >= {wanted}; pick another torch")
    return torch_version


def install(base: Base) -> str:
    """Install torch (kept if suitable), triton, the fork (editable where the
    base is installed, else its dependencies), the test requirements and the
    test tools into the base's environment: what is missing or too old only."""
    check_python(base)
    if not base.fork.exists():
        raise ForkError(f"{base.fork} does not exist; run 'materialize' first")
    torch_version = install_torch(base)
    requirements = ["triton", *base.test_requirements, *TEST_TOOLS]
    if not base.installed:
        requirements += release_dependencies(base)
    wanted = unmet(requirements, installed_versions(base, [requirement_name(r) for r in requirements]))
    editable = base.installed and not fork_imports_from_root(base)
    if editable:
        # compat: a path entry for the checkout, which outranks the checkout
        # folder ./torchtitan that Python finds first from the repository root
        wanted += ["--config-settings", "editable_mode=compat", "-e", str(base.fork)]
    if wanted:
        with tempfile.TemporaryDirectory() as tmp:
            constraints = Path(tmp, "constraints.txt")
            constraints.write_text(f"torch=={torch_version}\n")
            pip(base, "install", "--quiet", "-c", str(constraints), *wanted)
    done = f"installed into {base.venv}" if wanted else f"{base.venv} had all it needs"
    if not base.installed:
        return f"{done}: torch {torch_version} and torchtitan {base.version}'s dependencies (the fork itself runs from {base.fork})"
    if editable and not fork_imports_from_root(base):
        raise ForkError(f"from {ROOT}, 'import torchtitan' in {base.venv} does not load {base.fork}; see pip's output above")
    return f"{done}: torch {torch_version}, torchtitan from {base.fork}"


def fork_imports_from_root(base: Base) -> bool:
    """Whether `import torchtitan` in the base's environment, run from the
    repository root as the configs' commands are, loads the fork's package
    rather than the checkout folder or another checkout's fork."""
    proc = subprocess.run(
        [str(base.python), "-c", "import torchtitan; print(torchtitan.__file__)"],
        cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True, text=True,
    )
    return proc.stdout.strip() == str(base.fork / "torchtitan" / "__init__.py")
