"""The release sdist from PyPI: downloaded through pip, its sha256 checked
before anything is unpacked."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gqa import ForkError
from gqa.bases import Base

# Left out of the base commit: setuptools rewrites it on every install.
GENERATED_METADATA = "torchtitan.egg-info"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_sdist(base: Base, sdist: Path | None) -> Path:
    """The release sdist, downloaded through pip if needed, its sha256 checked."""
    if sdist is None:
        sdist = base.sdist_cache
        if not sdist.exists():
            download_sdist(base, sdist)
    if sdist.is_dir():
        raise ForkError(f"--sdist {sdist} is a folder; pass the path of the file {base.sdist_name}")
    if not sdist.is_file():
        raise ForkError(f"sdist {sdist} does not exist; pass the path of {base.sdist_name} or omit --sdist to download it")
    actual = sha256_of(sdist)
    if actual != base.sdist_sha256:
        way_out = (
            f"move it away and run again to download {base.sdist_name}" if sdist == base.sdist_cache
            else f"pass PyPI's {base.sdist_name}, or omit --sdist to download it"
        )
        raise ForkError(f"sha256 of {sdist} is {actual}, expected {base.sdist_sha256}, so it is not the release; {way_out}")
    return sdist


def download_sdist(base: Base, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        requirement = Path(tmp, "requirement.txt")
        requirement.write_text(f"torchtitan=={base.version} --hash=sha256:{base.sdist_sha256}\n")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
             "--require-hashes", "-r", str(requirement), "-d", tmp],
            capture_output=True, text=True,
        )
        downloaded = Path(tmp, base.sdist_name)
        if proc.returncode != 0 or not downloaded.exists():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ForkError(f"could not download {base.sdist_name} with pip ({tail}); check the network or pass --sdist FILE")
        shutil.move(downloaded, target)


def release_members(base: Base, sdist: Path) -> dict[str, tarfile.TarInfo]:
    """The sdist's files by their path in the release, generated metadata left out."""
    prefix = f"torchtitan-{base.version}/"
    with tarfile.open(sdist) as tar:
        return {
            m.name[len(prefix):]: m for m in tar.getmembers()
            if m.name.startswith(prefix) and not m.name.startswith(prefix + GENERATED_METADATA)
        }


def unpack(base: Base, sdist: Path, dest: Path) -> None:
    members = []
    for name, member in release_members(base, sdist).items():
        member.name = name
        members.append(member)
    # The archive's sha256 was checked; the data filter (Python 3.10.12+,
    # 3.11.4+) guards the extraction as well where this Python has it.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, members=members, **safe)


def release_files(base: Base, sdist: Path, paths: set[str]) -> dict[str, bytes | None]:
    """The release's content of each of `paths`, None where it has no such file."""
    members = release_members(base, sdist)
    with tarfile.open(sdist) as tar:
        return {path: tar.extractfile(members[path]).read() if path in members else None for path in paths}
