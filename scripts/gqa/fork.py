"""The fork: a git checkout of the release with one commit per patch of the
series. materialize builds or updates it, export writes its commits back to
the series, check applies the series to a pristine release."""

from __future__ import annotations

import filecmp
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from gqa import ForkError
from gqa.bases import Base
from gqa.release import GENERATED_METADATA, release_files, unpack, verified_sdist

# git am records the patch's author; the committer is this tool.
COMMITTER = {"GIT_COMMITTER_NAME": "gqa-fork", "GIT_COMMITTER_EMAIL": "gqa-fork@localhost"}
# Pinned so that export output does not depend on the user's git config.
FORMAT_PATCH_CONFIG = [
    "-c", "diff.noprefix=false",
    "-c", "diff.mnemonicPrefix=false",
    "-c", "diff.relative=false",
    "-c", "format.signature=",
    "-c", "format.headers=",
    "-c", "format.coverLetter=false",
]
FORK_EXCLUDES = f"__pycache__/\n*.pyc\n/{GENERATED_METADATA}/\n/outputs/\n/build/\n"
# In the fork's .git: the series' patches (name, sha256) as of the last
# materialize or export.
SYNC_RECORD = "gqa-fork-synced.json"


def git(cwd: Path, *args: str, env: dict | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
    )
    if check and proc.returncode != 0:
        raise ForkError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()}")
    return proc.stdout


def read_series(base: Base) -> list[str]:
    names = [
        line.strip()
        for line in base.series.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name in names:
        if not (base.patches / name).is_file():
            raise ForkError(f"{base.series} lists {name}, which is not in {base.patches}; restore it or remove the line")
    return names


def select_patches(base: Base, upto: str | None) -> list[str]:
    names = read_series(base)
    if upto is None:
        return names
    for i, name in enumerate(names):
        if upto in (name, name.split("-", 1)[0], name.removesuffix(".patch")):
            return names[: i + 1]
    raise ForkError(f"--upto {upto!r} matches no patch in {base.series}; use one of: {', '.join(names)}")


def touched_files(base: Base, names: list[str]) -> set[str]:
    """The paths that these patches create, change or delete."""
    return {
        path
        for name in names
        for path in re.findall(r"^diff --git a/(\S+) b/", (base.patches / name).read_text(), re.MULTILINE)
    }


def check_upstream_matches_release(base: Base, upstream: Path, sdist: Path, names: list[str]) -> None:
    """Upstream's release tag must hold what the release holds in every file the series touches."""
    for path, release in sorted(release_files(base, sdist, touched_files(base, names)).items()):
        proc = subprocess.run(["git", "-C", upstream, "show", f"{base.tag}:{path}"], capture_output=True)
        tagged = proc.stdout if proc.returncode == 0 else None
        if tagged != release:
            raise ForkError(
                f"{upstream} at {base.tag} differs from the PyPI release in {path}, which the series "
                f"touches; check out upstream's own {base.tag} tag there, or omit --upstream"
            )


def patch_digests(base: Base, names: list[str]) -> list[list[str]]:
    return [[name, hashlib.sha256((base.patches / name).read_bytes()).hexdigest()] for name in names]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def record_sync(base: Base, fork: Path) -> None:
    """Remember the series as it is now: what the fork was last made from or
    exported to, so that later changes are known to be the fork's or the series'."""
    (fork / ".git" / SYNC_RECORD).write_text(json.dumps(patch_digests(base, read_series(base))) + "\n")


def last_sync(base: Base, fork: Path) -> list[list[str]]:
    """The series as it was at the last materialize or export. A fork made
    before the record existed counts as made from the series as it is now."""
    record = fork / ".git" / SYNC_RECORD
    return json.loads(record.read_text()) if record.exists() else patch_digests(base, read_series(base))


def fork_state(base: Base, fork: Path) -> tuple[list[str], str]:
    """The fork's commits since the base as patch texts, and its uncommitted changes."""
    if not fork.exists():
        raise ForkError(f"there is no fork at {fork}; run 'materialize' first")
    if not (fork / ".git").exists() or not git(fork, "tag", "--list", base.tag).strip():
        raise ForkError(
            f"{fork} exists but is not a fork made by this tool (no git tag {base.tag}); move it away, "
            f"or run 'materialize --discard' to keep it as a backup folder and rebuild"
        )
    dirty = git(fork, "status", "--porcelain")
    with tempfile.TemporaryDirectory() as tmp:
        format_patches(base, fork, Path(tmp))
        texts = [p.read_text() for p in sorted(Path(tmp).glob("*.patch"))]
    return texts, dirty


def changes_since_sync(base: Base, fork: Path, commits: list[str]) -> tuple[bool, list[str]]:
    """Whether the fork has commits that were not in the series at the last
    sync, and the patches of the series that changed since then."""
    synced = last_sync(base, fork)
    fork_changed = [text_digest(c) for c in commits] != [digest for _, digest in synced[: len(commits)]]
    current = patch_digests(base, read_series(base))
    changed_patches = [name for name, digest in current if [name, digest] not in synced]
    changed_patches += [name for name, _ in synced if name not in dict(current)]
    return fork_changed, changed_patches


def format_patches(base: Base, fork: Path, out: Path) -> list[str]:
    git(
        fork, *FORMAT_PATCH_CONFIG, "format-patch", "--zero-commit", "--no-signature",
        "--full-index", "--no-numbered", "-o", str(out), f"{base.tag}..HEAD",
    )
    return sorted(p.name for p in out.glob("*.patch"))


def apply_patches(base: Base, fork: Path, names: list[str]) -> None:
    """git am each patch; on failure roll the fork back to where it was."""
    start = git(fork, "rev-parse", "HEAD").strip()
    for name in names:
        proc = subprocess.run(
            ["git", "am", "--keep-non-patch", "--committer-date-is-author-date", "--quiet", str(base.patches / name)],
            cwd=fork, env={**os.environ, **COMMITTER}, capture_output=True, text=True,
        )
        if proc.returncode != 0:
            git(fork, "am", "--abort", check=False)
            git(fork, "reset", "--hard", "--quiet", start)
            failed = re.findall(r"(?:patch failed|does not exist in index|already exists in working directory): (\S+)", proc.stderr + proc.stdout)
            where = f" at {failed[0]}" if failed else ""
            raise ForkError(
                f"patch {name} does not apply{where}; the fork was left as it was. "
                f"Regenerate it from a fork with 'export', or fix the patch file"
            )


def commit_release(base: Base, staging: Path, sdist: Path) -> None:
    """The verified release as the base commit of a new repository."""
    unpack(base, sdist, staging)
    git(staging, "init", "--quiet", "--initial-branch=gqa")
    git(staging, "add", "--all")
    identity = {
        f"GIT_{role}_{field}": value
        for role in ("AUTHOR", "COMMITTER")
        for field, value in (("NAME", "PyTorch Team"), ("EMAIL", "packages@pytorch.org"), ("DATE", base.release_date))
    }
    git(
        staging, "commit", "--quiet", "--no-verify",
        "-m", f"torchtitan {base.version} release from PyPI\n\nsdist sha256 {base.sdist_sha256}\n"
        f"{GENERATED_METADATA}/ is left out: setuptools rewrites it on every install.",
        env=identity,
    )
    git(staging, "tag", base.tag)


def check_out_upstream(base: Base, staging: Path, upstream: Path, sdist: Path, names: list[str]) -> None:
    """Upstream's own release commit as the base, so that the branch shares its history."""
    if git(upstream, "rev-parse", "--verify", "--quiet", f"{base.tag}^{{commit}}", check=False).strip() == "":
        raise ForkError(
            f"{upstream} has no tag {base.tag}; fetch upstream's tags there "
            f"(git -C {upstream} fetch --tags) or omit --upstream"
        )
    check_upstream_matches_release(base, upstream, sdist, names)
    git(staging.parent, "clone", "--quiet", "--no-checkout", str(upstream.resolve()), str(staging))
    git(staging, "checkout", "--quiet", "-b", "gqa", base.tag)


def build_fork(base: Base, dest: Path, names: list[str], sdist: Path | None, upstream: Path | None = None) -> Path:
    """The release (or upstream's release commit) plus the patches, built in a
    new folder beside dest; the caller moves it in place."""
    sdist = verified_sdist(base, sdist)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        if upstream is None:
            commit_release(base, staging, sdist)
        else:
            check_out_upstream(base, staging, upstream, sdist, names)
        (staging / ".git" / "info" / "exclude").write_text(FORK_EXCLUDES)
        apply_patches(base, staging, names)
        record_sync(base, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def backup_name(dest: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidates = (dest.with_name(f"{dest.name}.backup-{stamp}{f'-{n}' if n else ''}") for n in itertools.count())
    return next(c for c in candidates if not c.exists())


def materialize(
    base: Base, dest: Path, upto: str | None, sdist: Path | None, discard: bool, upstream: Path | None = None
) -> str:
    names = select_patches(base, upto)
    if sdist is not None:
        verified_sdist(base, sdist)
    if not dest.exists() or discard or upstream is not None:
        if dest.exists() and not discard:
            raise ForkError(
                f"{dest} exists; --upstream builds a new fork: pass --discard too "
                f"to keep the old one as a backup folder"
            )
        built = build_fork(base, dest, names, sdist, upstream)
        if dest.exists():
            backup = backup_name(dest)
            dest.rename(backup)
            print(f"kept the old {dest.name} as {backup}")
        built.rename(dest)
        origin = f"upstream {base.tag} from {upstream}" if upstream else base.version
        return f"{dest}: {origin} + {len(names)} patches"

    commits, dirty = fork_state(base, dest)
    if dirty:
        raise ForkError(
            f"{dest} has uncommitted changes; commit them and run 'export', "
            f"or pass --discard to keep the fork as a backup folder and rebuild"
        )
    fork_changed, changed_patches = changes_since_sync(base, dest, commits)
    if fork_changed and changed_patches:
        raise ForkError(
            f"both {dest} (commits not in the series) and the series ({', '.join(changed_patches)}) changed "
            f"since the fork was made; run 'materialize --discard' to rebuild from the series "
            f"(the fork is kept as a backup folder) and carry your commits over from the backup"
        )
    if fork_changed:
        raise ForkError(
            f"{dest} has commits that are not in {base.series}; run 'export' to keep them, "
            f"or pass --discard to keep the fork as a backup folder and rebuild"
        )
    wanted = [(base.patches / n).read_text() for n in names]
    if commits == wanted:
        return f"{dest}: up to date ({base.version} + {len(names)} patches)"
    # Every commit is one the series had, so moving the branch loses nothing.
    common = next((i for i, (a, b) in enumerate(zip(commits, wanted)) if a != b), min(len(commits), len(wanted)))
    git(dest, "reset", "--hard", "--quiet", f"HEAD~{len(commits) - common}")
    apply_patches(base, dest, names[common:])
    record_sync(base, dest)
    updated = f" (series changed: {', '.join(changed_patches)})" if changed_patches else ""
    return f"{dest}: {base.version} + {len(names)} patches{updated}"


def materialize_release_path(base: Base, sdist: Path | None) -> str:
    """The release's own code path that the tests compare with: the release plus
    the series up to base.release_path_upto. It is derived from the series
    alone, so once those patches change the old build is replaced."""
    names = select_patches(base, base.release_path_upto)
    path = base.release_path
    if path.exists():
        commits, dirty = fork_state(base, path)
        if dirty:
            raise ForkError(
                f"{path} has uncommitted changes, but it is rebuilt from the series; "
                f"make your changes in {base.fork} instead"
            )
        if commits != [(base.patches / name).read_text() for name in names]:
            shutil.rmtree(path)
    return materialize(base, path, base.release_path_upto, sdist, False)


def export(base: Base, drop_missing: bool = False) -> str:
    commits, dirty = fork_state(base, base.fork)
    if dirty:
        raise ForkError(f"{base.fork} has uncommitted changes; commit them in the fork, then export")
    old = read_series(base)
    _, changed_patches = changes_since_sync(base, base.fork, commits)
    if changed_patches and commits != [(base.patches / n).read_text() for n in old]:
        raise ForkError(
            f"the series changed since the fork was made ({', '.join(changed_patches)}) and export would "
            f"overwrite that; run 'materialize' to bring the changes into the fork first"
        )
    if len(commits) < len(old) and not drop_missing:
        raise ForkError(
            f"the fork holds {len(commits)} commits and {base.series} {len(old)} patches (was it made "
            f"with --upto?); run 'materialize' to bring it to the whole series, or pass --drop-missing "
            f"to delete the patches it lacks from {base.patches}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        names = format_patches(base, base.fork, Path(tmp))
        for name in names:
            shutil.copyfile(Path(tmp, name), base.patches / name)
    for name in set(old) - set(names):
        (base.patches / name).unlink()
    base.series.write_text("".join(f"{n}\n" for n in names))
    record_sync(base, base.fork)
    return f"exported {len(names)} patches to {base.patches}/"


def check(base: Base, sdist: Path | None) -> str:
    names = read_series(base)
    unlisted = sorted(p.name for p in base.patches.glob("*.patch") if p.name not in names)
    if unlisted:
        raise ForkError(f"{base.patches} holds files not in series: {', '.join(unlisted)}; add them to series or delete them")
    with tempfile.TemporaryDirectory() as tmp:
        fork = build_fork(base, Path(tmp, "torchtitan"), names, sdist)
        out = Path(tmp, "exported")
        out.mkdir()
        exported = format_patches(base, fork, out)
        drift = [n for n in names if n not in exported or not filecmp.cmp(out / n, base.patches / n, shallow=False)]
    if drift or exported != names:
        raise ForkError(
            f"patches apply but are not in exported form ({', '.join(drift or exported)}); "
            f"materialize the fork and run 'export'"
        )
    return f"ok: {len(names)} patches apply cleanly to pristine torchtitan {base.version} and round-trip through export"
