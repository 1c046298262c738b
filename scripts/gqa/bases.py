"""The torchtitan releases the series are made for: one record per release.

Only this module knows a version string; everything else takes a Base.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build"


@dataclass(frozen=True)
class Base:
    version: str
    sdist_sha256: str
    # the release's date: the base commit is the same on every machine
    release_date: str
    # the series: `series` plus its patch files
    patches: Path
    # where `materialize` puts the fork
    fork: Path
    # upstream git refs that hold the release, tried in order by --upstream
    upstream_refs: tuple[str, ...]
    # the oldest torch and Python the fork runs on
    min_torch: tuple[int, int]
    min_python: tuple[int, int]
    # the torch that `install` puts into the base's environment where it sees
    # none of at least min_torch: pip arguments, split as a shell would
    torch: str
    # where `install` makes the base's own virtual environment: installing one
    # base never changes another's
    venv: Path
    # whether the fork is installed into the Python (editable), so that the
    # train configs run from it; otherwise its tests import it from PYTHONPATH
    installed: bool
    # the release's own code path that the tests compare with, made from the
    # release and the series up to `release_path_upto` (None: no such path)
    release_path: Path | None = None
    release_path_upto: str | None = None
    # pip requirements that only the tests need, installed beside the fork's
    test_requirements: tuple[str, ...] = ()

    @property
    def tag(self) -> str:
        return f"v{self.version}"

    @property
    def sdist_name(self) -> str:
        return f"torchtitan-{self.version}.tar.gz"

    @property
    def sdist_cache(self) -> Path:
        return BUILD / self.sdist_name

    @property
    def series(self) -> Path:
        return self.patches / "series"

    @property
    def python(self) -> Path:
        """The Python of the base's environment, which runs its forks' processes."""
        return self.venv / "bin" / "python"


BASES = {
    base.version: base
    for base in (
        Base(
            version="0.2.1",
            sdist_sha256="0b288bd9eb3d775f20ba00d9d71449023c8b224e356fa46744b94aa863217ca8",
            release_date="2025-12-26T00:00:00+00:00",
            patches=ROOT / "patches" / "0.2.1",
            fork=ROOT / "torchtitan",
            upstream_refs=("v0.2.1",),
            min_torch=(2, 11),
            min_python=(3, 10),
            # pinned: a bare "torch" would pull the newest release's CUDA wheels
            torch=os.environ.get("GQA_FORK_TORCH", "torch==2.13.0"),
            venv=BUILD / "venv-0.2.1",
            installed=True,
            # 0001 only makes varlen run on current torch
            release_path=BUILD / "torchtitan-0.2.1-compat",
            release_path_upto="0001",
        ),
        Base(
            version="0.3.0",
            sdist_sha256="6351b2dc6cdd8bdad15cd2ce5d9520e391a75b584770d2ebd925cc3321cd1b47",
            release_date="2026-09-03T00:00:00+00:00",
            patches=ROOT / "patches" / "0.3.0",
            fork=ROOT / "torchtitan-0.3.0",
            upstream_refs=("v0.3.0", "release/0.3", "origin/release/0.3"),
            # torch 2.11 lacks torch.distributed.fsdp.DataParallelMeshDims, and
            # 2.13's fully_shard refuses spmd_types' plain-tensor parameters
            min_torch=(2, 14),
            min_python=(3, 11),
            torch="torch==2.14.1",
            venv=BUILD / "venv-0.3.0",
            # both forks are packages named torchtitan: one is installed
            installed=False,
            # Qwen3.5 imports fla (its linear-attention layers) and torchvision
            # (its vision encoder); float8 on the QKV projections needs torchao
            test_requirements=("fla-core==0.6.0", "torchvision==0.29.1", "torchao==0.18.0"),
        ),
    )
}
DEFAULT = "0.2.1"
