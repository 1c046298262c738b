"""The fork: a git checkout of the release with one commit per patch of the
series. materialize builds or updates it, export writes its commits back to
the series, check applies the series to a pristine release."""

from __future__ import annotations

import contextlib
import filecmp
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

from gqa import ForkError
from gqa.bases import Base, ROOT
from gqa.release import GENERATED_METADATA, release_files, release_members, unpack, verified_sdist

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
# In the fork's .git: the series' patches (name, sha256) and the fork's
# commits (sha256 of their format-patch text) as of the last materialize or export.
SYNC_RECORD = "gqa-fork-synced.json"
UPSTREAM_URL = "https://github.com/pytorch/torchtitan"
# A patch's edits to files of upstream's that the release sdist lacks (its
# tests) sit beside the series in this folder, under the patch's name. They
# join the patch's commit where the fork is built on upstream's own release
# commit (--upstream), and upstream's tests are run with them.
UPSTREAM_EDITS = "upstream-tests"


def git(cwd: Path, *args: str, env: dict | None = None, check: bool = True, shielded: bool = False) -> str:
    """git's output; shielded: in a session of its own, which Ctrl-C at the
    terminal does not reach (see interrupts_deferred)."""
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        start_new_session=shielded,
    )
    if check and proc.returncode != 0:
        raise ForkError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()}")
    return proc.stdout


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C inside the block takes effect when the block is done, so that
    what it changes is changed whole (its git calls must be shielded)."""
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt


def count(items: list, noun: str) -> str:
    """'1 patch', '8 patches'."""
    return f"{len(items)} {noun}{'' if len(items) == 1 else 'es' if noun.endswith('ch') else 's'}"


def archive(repo: Path, commit: str, dest: Path, *paths: str) -> Path:
    """The tree of `commit` in the git repository `repo` (only `paths`, if
    given), written into the folder `dest`."""
    proc = subprocess.run(["git", "-C", repo, "archive", commit, *paths], capture_output=True)
    if proc.returncode != 0:
        raise ForkError(f"could not read {' '.join(paths) or 'the tree'} at {commit[:12]} in {repo}: {proc.stderr.decode().strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", dest], input=proc.stdout, check=True)
    return dest


def read_series(base: Base) -> list[str]:
    """The series' patch names, once each is known to be a whole patch file."""
    if not base.series.is_file():
        raise ForkError(f"{base.series} does not exist; restore it (git checkout -- {base.patches})")
    names = [
        line.strip()
        for line in base.series.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name in names:
        path = base.patches / name
        if not path.is_file():
            raise ForkError(f"{base.series} lists {name}, which is not in {base.patches}; restore it or remove the line")
        problem = damage(path)
        if problem:
            raise ForkError(f"{path} {problem}; restore it with 'git checkout -- {path}', or mend it by hand")
    return names


HUNK = re.compile(r"@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")


def damage(path: Path) -> str | None:
    """How a patch file differs from any that git format-patch writes, if it
    does: empty, not a patch, or truncated (it ends inside a hunk)."""
    data = path.read_bytes()
    if not data.strip():
        return "is empty"
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return "is not a patch (it is not text)"
    if not text.startswith("From ") or "\ndiff --git " not in text:
        return "is not a patch (it has no mail header or no diff)"
    old = new = 0
    for number, line in enumerate(text.split("\n")[:-1], start=1):
        if old or new:
            kind = line[:1]
            if kind not in (" ", "", "-", "+", "\\"):
                return f"is damaged: line {number} lies inside a hunk but is no hunk line"
            old -= kind in (" ", "", "-")
            new -= kind in (" ", "", "+")
        elif hunk := HUNK.match(line):
            old, new = (int(n) if n is not None else 1 for n in hunk.groups())
    if old or new or not text.endswith("\n"):
        return "is truncated: it ends inside a hunk"
    return None


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


def check_upstream_matches_release(base: Base, upstream: Path, commit: str, sdist: Path, names: list[str]) -> None:
    """Upstream's release commit must hold what the release holds in every file the series touches."""
    for path, release in sorted(release_files(base, sdist, touched_files(base, names)).items()):
        proc = subprocess.run(["git", "-C", upstream, "show", f"{commit}:{path}"], capture_output=True)
        tagged = proc.stdout if proc.returncode == 0 else None
        if tagged != release:
            raise ForkError(
                f"{upstream} at {base.tag} differs from the PyPI release in {path}, which the series "
                f"touches; check out upstream's own {base.tag} there, or omit --upstream"
            )


def patch_digests(base: Base, names: list[str]) -> list[list[str]]:
    """Each patch's digest, taken over its edits to upstream's tests too: a
    change to either is a change of the series."""
    def digest(name: str) -> str:
        edits = base.patches / UPSTREAM_EDITS / name
        return hashlib.sha256((base.patches / name).read_bytes() + (edits.read_bytes() if edits.is_file() else b"")).hexdigest()

    return [[name, digest(name)] for name in names]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sync_record(base: Base, commits: list[str]) -> dict[str, list]:
    """The series as it is now and the fork's commits (patch texts), to be
    remembered after a materialize or export, so that later changes are known
    to be the fork's or the series'."""
    return {"series": patch_digests(base, read_series(base)), "commits": [text_digest(c) for c in commits]}


def write_sync_record(fork: Path, record: dict[str, list]) -> None:
    path = fork / ".git" / SYNC_RECORD
    path.with_suffix(".new").write_text(json.dumps(record) + "\n")
    path.with_suffix(".new").replace(path)


def last_sync(base: Base, fork: Path) -> dict[str, list]:
    """The series and the fork's commits at the last materialize or export. A
    fork made before the record existed counts as made from the series as it
    is now, one with the older record (the series alone) as made from the
    series as it was then; either way its commits were the patches' texts."""
    path = fork / ".git" / SYNC_RECORD
    record = json.loads(path.read_text()) if path.exists() else patch_digests(base, read_series(base))
    if isinstance(record, list):
        return {"series": record, "commits": [digest for _, digest in record]}
    return record


def fork_state(base: Base, fork: Path) -> tuple[list[str], str]:
    """The fork's commits since the base as patch texts, and its uncommitted changes."""
    if not fork.exists():
        raise ForkError(f"there is no fork at {fork}; run 'materialize' first")
    if not (fork / ".git").exists() or not git(fork, "tag", "--list", base.tag).strip():
        raise ForkError(
            f"{fork} exists but is not a fork made by this tool (no git tag {base.tag}); move it away, "
            f"or run 'materialize --discard' to keep it as a backup folder and rebuild"
        )
    if (fork / ".git" / "rebase-apply").exists():
        raise ForkError(
            f"{fork} is in the middle of a 'git am'; finish it (git -C {fork} am --continue) "
            f"or undo it (git -C {fork} am --abort), then run again"
        )
    dirty = git(fork, "status", "--porcelain")
    return commit_texts(base, fork), dirty


def commit_texts(base: Base, fork: Path, head: str = "HEAD") -> list[str]:
    """The fork's commits from the base up to `head`, as patch texts."""
    with tempfile.TemporaryDirectory() as tmp:
        format_patches(base, fork, Path(tmp), head)
        return [p.read_text() for p in sorted(Path(tmp).glob("*.patch"))]


def changes_since_sync(base: Base, fork: Path, commits: list[str]) -> tuple[bool, list[str], int]:
    """Since the last sync: whether the fork has commits that are neither what
    it had then nor the series' patches as they are now, the patches of the
    series that changed, and how many of the fork's first commits are the
    series' first patches."""
    record = last_sync(base, fork)
    digests = [text_digest(c) for c in commits]
    current = patch_digests(base, read_series(base))
    # the patches' own texts, which a fork's commits equal where it is built on the release
    patch_texts = [text_digest((base.patches / name).read_text()) for name, _ in current]
    changed_patches = [name for name, digest in current if [name, digest] not in record["series"]]
    changed_patches += [name for name, _ in record["series"] if name not in dict(current)]

    def synced(i: int) -> bool:
        """Commit i was the fork's at the last sync, its patch unchanged since."""
        return i < min(len(record["commits"]), len(record["series"]), len(current)) and (
            digests[i] == record["commits"][i] and current[i] == record["series"][i]
        )

    def is_patch(i: int) -> bool:
        """Commit i is the series' patch i as the series holds it now."""
        return i < len(current) and digests[i] == patch_texts[i]

    fork_changed = any(
        not is_patch(i) and (i >= len(record["commits"]) or digests[i] != record["commits"][i])
        for i in range(len(digests))
    )
    in_sync = next((i for i in range(len(digests)) if not (synced(i) or is_patch(i))), len(digests))
    return fork_changed, changed_patches, in_sync


def format_patches(base: Base, fork: Path, out: Path, head: str = "HEAD", *paths: str) -> list[str]:
    """The fork's commits from the base up to `head` (or the commit range
    `head`, if it has '..') as patch files in `out`, limited to `paths` if given."""
    revisions = head if ".." in head else f"{base.tag}..{head}"
    git(
        fork, *FORMAT_PATCH_CONFIG, "format-patch", "--zero-commit", "--no-signature",
        "--full-index", "--no-numbered", "-o", str(out), revisions, *(["--", *paths] if paths else []),
    )
    return sorted(p.name for p in out.glob("*.patch"))


def built_on_upstream(base: Base, fork: Path) -> bool:
    """Whether the fork's base commit is upstream's (--upstream), not the sdist's."""
    return git(fork, "log", "-1", "--format=%s", base.tag).strip() != release_subject(base)


def upstream_only_files(base: Base, fork: Path) -> list[str]:
    """The files the fork's commits change that its base commit, upstream's
    release commit, has and the release sdist lacks: upstream's tests."""
    changed = git(fork, "diff", "--name-only", base.tag, "HEAD").split()
    in_base = git(fork, "ls-tree", "-r", "--name-only", base.tag, "--", *changed).split() if changed else []
    release = release_members(base, verified_sdist(base, None))
    return sorted(path for path in in_base if path not in release)


def write_upstream_edits(base: Base, fork: Path, files: list[str], names: list[str], out: Path) -> list[str]:
    """Each commit's edits to `files` as a patch named after the commit's own
    (`names`, in order) in `out`; the names written."""
    written = []
    commits = git(fork, "rev-list", "--reverse", f"{base.tag}..HEAD").split()
    for commit, name in zip(commits, names):
        changed = git(fork, "diff-tree", "--no-commit-id", "--name-only", "-r", commit).split()
        if not set(changed) & set(files):
            continue
        with tempfile.TemporaryDirectory() as one:
            [edits] = format_patches(base, fork, Path(one), f"{commit}~..{commit}", *files)
            out.mkdir(exist_ok=True)
            shutil.move(Path(one, edits), out / name)
        written.append(name)
    return written


def apply_patches(base: Base, fork: Path, names: list[str], contributor: dict[str, str] | None = None) -> None:
    """git am each patch; on failure roll the fork back to where it was. With
    a contributor (a branch on upstream's release commit), each commit also
    takes the patch's edits to upstream's tests and the contributor as its
    author and committer."""
    start = git(fork, "rev-parse", "HEAD").strip()

    def failed(patch: Path, output: str) -> ForkError:
        git(fork, "am", "--abort", check=False)
        git(fork, "reset", "--hard", "--quiet", start)
        paths = re.findall(r"(?:patch failed|does not exist in index|already exists in working directory): (\S+)", output)
        where = f" at {paths[0]}" if paths else ""
        return ForkError(
            f"patch {patch.relative_to(base.patches)} does not apply{where}; the fork was left as it was. "
            f"Mend the patch file, or restore it with 'git checkout -- {patch}'"
        )

    for name in names:
        proc = subprocess.run(
            ["git", "am", "--keep-non-patch", "--committer-date-is-author-date", "--quiet", str(base.patches / name)],
            cwd=fork, env={**os.environ, **(contributor or COMMITTER)}, capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise failed(base.patches / name, proc.stderr + proc.stdout)
        if contributor is None:
            continue
        edits = base.patches / UPSTREAM_EDITS / name
        if edits.is_file():
            proc = subprocess.run(["git", "apply", "--index", str(edits)], cwd=fork, capture_output=True, text=True)
            if proc.returncode != 0:
                raise failed(edits, proc.stderr)
        author = f"{contributor['GIT_AUTHOR_NAME']} <{contributor['GIT_AUTHOR_EMAIL']}>"
        git(fork, "commit", "--amend", "--quiet", "--no-edit", "--no-verify", f"--author={author}", env=contributor)


def release_subject(base: Base) -> str:
    """The subject of the base commit of a fork built on the release sdist."""
    return f"torchtitan {base.version} release from PyPI"


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
        "-m", f"{release_subject(base)}\n\nsdist sha256 {base.sdist_sha256}\n"
        f"{GENERATED_METADATA}/ is left out: setuptools rewrites it on every install.",
        env=identity,
    )
    git(staging, "tag", base.tag)


def upstream_release_commit(base: Base, upstream: Path) -> str:
    """The commit of upstream's release (its tag, or the release branch) in the
    git checkout `upstream`."""
    if not upstream.is_dir():
        raise ForkError(f"--upstream {upstream} is not a folder; pass a git clone of {UPSTREAM_URL}")
    toplevel = git(upstream, "rev-parse", "--show-toplevel", check=False).strip()
    bare = git(upstream, "rev-parse", "--is-bare-repository", check=False).strip() == "true"
    if not bare and (not toplevel or Path(toplevel).resolve() != upstream.resolve()):
        raise ForkError(
            f"--upstream {upstream} is not a git repository; clone upstream there "
            f"(git clone {UPSTREAM_URL} {upstream}) or omit --upstream"
        )
    for ref in base.upstream_refs:
        commit = git(upstream, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False).strip()
        if commit:
            return commit
    raise ForkError(
        f"{upstream} has no {' or '.join(base.upstream_refs)}; fetch upstream's tags and branches there "
        f"(git -C {upstream} fetch --tags origin) or omit --upstream"
    )


def contributor_identity(upstream: Path, author: str | None) -> dict[str, str]:
    """Who the branch's commits say wrote and committed them: `author`
    ('Name <email>'), else the user's git identity as the clone sees it."""
    if author is not None:
        parsed = re.fullmatch(r"\s*([^<>]*\S)\s*<([^<>\s]+@[^<>\s]+)>\s*", author)
        if parsed is None:
            raise ForkError(f"--author {author!r} is not of the form 'Name <email>'; pass e.g. --author 'Ada Lovelace <ada@example.com>'")
        name, email = parsed.groups()
    else:
        name = git(upstream, "config", "user.name", check=False).strip()
        email = git(upstream, "config", "user.email", check=False).strip()
        if not (name and email):
            raise ForkError(
                "--upstream makes the branch you send upstream, and its commits carry your identity (upstream's CLA "
                "check reads it): set git config user.name and user.email, or pass --author 'Name <email>'"
            )
    return {f"GIT_{role}_{field}": value for role in ("AUTHOR", "COMMITTER") for field, value in (("NAME", name), ("EMAIL", email))}


def check_out_upstream(base: Base, staging: Path, upstream: Path, sdist: Path, names: list[str]) -> None:
    """Upstream's own release commit as the base, so that the branch shares its
    history; tagged with the release's tag in the fork where upstream's ref was
    a branch."""
    commit = upstream_release_commit(base, upstream)
    check_upstream_matches_release(base, upstream, commit, sdist, names)
    git(staging.parent, "clone", "--quiet", "--no-checkout", str(upstream.resolve()), str(staging))
    # -B: the clone has a branch of upstream's current branch, which may be named gqa
    git(staging, "checkout", "--quiet", "-B", "gqa", commit)
    if not git(staging, "tag", "--list", base.tag).strip():
        git(staging, "tag", base.tag, commit)


def build_fork(
    base: Base, dest: Path, names: list[str], sdist: Path | None, upstream: Path | None = None, author: str | None = None
) -> Path:
    """The release (or upstream's release commit, with the contributor as the
    patches' author) plus the patches, built in a new folder beside dest; the
    caller moves it in place."""
    sdist = verified_sdist(base, sdist)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        contributor = None
        if upstream is None:
            commit_release(base, staging, sdist)
        else:
            check_out_upstream(base, staging, upstream, sdist, names)
            contributor = contributor_identity(upstream, author)
        (staging / ".git" / "info" / "exclude").write_text(FORK_EXCLUDES)
        apply_patches(base, staging, names, contributor)
        write_sync_record(staging, sync_record(base, commit_texts(base, staging)))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def fork_contributor(base: Base, fork: Path) -> dict[str, str] | None:
    """Who wrote the commits of a fork built with --upstream (None for a fork
    on the release): its last commit's author, else the user's git identity."""
    if not built_on_upstream(base, fork):
        return None
    author = git(fork, "log", "-1", "--format=%an <%ae>", f"{base.tag}..HEAD").strip()
    return contributor_identity(fork, author or None)


def updated_commit(base: Base, fork: Path, start: str, names: list[str]) -> str:
    """The commit `start` of the fork plus the patches `names`, applied in a
    temporary worktree: the fork's own checkout is not touched, so an
    interrupted or failed update leaves it as it was. On a fork built with
    --upstream they carry its contributor and the edits to upstream's tests."""
    contributor = fork_contributor(base, fork)
    git(fork, "worktree", "prune")
    # a git killed by Ctrl-C may leave files behind: they stay in the temporary folder
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        worktree = Path(tmp, "update")
        git(fork, "worktree", "add", "--quiet", "--detach", str(worktree), start)
        try:
            apply_patches(base, worktree, names, contributor)
            return git(worktree, "rev-parse", "HEAD").strip()
        finally:
            git(fork, "worktree", "remove", "--force", str(worktree), check=False)


def backup_name(dest: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidates = (dest.with_name(f"{dest.name}.backup-{stamp}{f'-{n}' if n else ''}") for n in itertools.count())
    return next(c for c in candidates if not c.exists())


def check_destination(base: Base, dest: Path) -> None:
    """A fork gets a folder of its own: not this repository, nor one that holds
    it, nor one inside it other than the base's own fork and release path."""
    if dest == ROOT or dest in ROOT.parents:
        raise ForkError(
            f"--dest {dest} is this repository{'' if dest == ROOT else ' or holds it'}; "
            f"pass a folder of the fork's own outside it, e.g. {ROOT.parent / 'torchtitan-fork'}"
        )
    if ROOT in dest.parents and dest not in (base.fork, base.release_path):
        raise ForkError(
            f"--dest {dest} is inside this repository, whose files it could replace; pass a folder outside "
            f"it, e.g. {ROOT.parent / 'torchtitan-fork'}, or omit --dest for {base.fork}"
        )
    under_file = next((parent for parent in dest.parents if parent.exists() and not parent.is_dir()), None)
    if under_file is not None:
        raise ForkError(f"--dest {dest} lies under {under_file}, which is a file; pass a folder's path")


def materialize(
    base: Base,
    dest: Path,
    upto: str | None,
    sdist: Path | None,
    discard: bool,
    upstream: Path | None = None,
    author: str | None = None,
) -> str:
    check_destination(base, dest)
    names = select_patches(base, upto)
    if sdist is not None:
        verified_sdist(base, sdist)
    if not dest.exists() or discard or upstream is not None:
        if dest.exists() and not discard:
            raise ForkError(
                f"{dest} exists; --upstream builds a new fork: pass --discard too "
                f"to keep the old one as a backup folder"
            )
        built = build_fork(base, dest, names, sdist, upstream, author)
        with interrupts_deferred():
            if dest.exists():
                backup = backup_name(dest)
                dest.rename(backup)
                print(f"kept the old {dest.name} as {backup}")
            built.rename(dest)
        origin = f"upstream {base.tag} from {upstream}" if upstream else base.version
        return f"{dest}: {origin} + {count(names, 'patch')}"

    commits, dirty = fork_state(base, dest)
    if dirty:
        raise ForkError(
            f"{dest} has uncommitted changes; commit them and run 'export', or run "
            f"'materialize --discard' to keep the fork as a backup folder and rebuild"
        )
    fork_changed, changed_patches, in_sync = changes_since_sync(base, dest, commits)
    if fork_changed and changed_patches:
        raise ForkError(
            f"both {dest} (commits not in the series) and the series ({', '.join(changed_patches)}) changed "
            f"since the fork was made; run 'materialize --discard' to rebuild from the series "
            f"(the fork is kept as a backup folder) and carry your commits over from the backup"
        )
    if fork_changed:
        raise ForkError(
            f"{dest} has commits that are not in {base.series}; run 'export' to keep them, or run "
            f"'materialize --discard' to keep the fork as a backup folder and rebuild"
        )
    # Every commit is one the series had, so moving the branch loses nothing.
    common = min(in_sync, len(names))
    if common == len(commits) == len(names):
        return f"{dest}: up to date ({base.version} + {count(names, 'patch')})"
    updated_head = updated_commit(base, dest, f"HEAD~{len(commits) - common}", names[common:])
    record = sync_record(base, commit_texts(base, dest, updated_head))
    # the only step that changes the fork, done whole
    with interrupts_deferred():
        try:
            # --keep: a file changed in the fork since the check above stops the reset
            git(dest, "reset", "--keep", "--quiet", updated_head, shielded=True)
        except ForkError:
            raise ForkError(
                f"files of {dest} changed during the update, which was stopped so as not to lose them; "
                f"run 'materialize' again"
            ) from None
        write_sync_record(dest, record)
    updated = (
        f" (series changed: {', '.join(changed_patches)}; 'export' writes them back in exported form)"
        if changed_patches else ""
    )
    return f"{dest}: {base.version} + {count(names, 'patch')}{updated}"


def materialize_release_path(base: Base, sdist: Path | None) -> str:
    """The release's own code path that the tests compare with: the release plus
    the series up to base.release_path_upto. It is derived from the series
    alone, so once those patches change the old build is replaced."""
    try:
        names = select_patches(base, base.release_path_upto)
    except ForkError:
        raise ForkError(
            f"{base.series} has no patch {base.release_path_upto}, which the tests' {base.version} path "
            f"is made from; restore the series (git checkout -- {base.patches})"
        ) from None
    path = base.release_path
    if path.exists():
        commits, dirty = fork_state(base, path)
        if dirty:
            raise ForkError(
                f"{path} has uncommitted changes, but it is rebuilt from the series; "
                f"make your changes in {base.fork} instead"
            )
        _, _, in_sync = changes_since_sync(base, path, commits)
        if not in_sync == len(commits) == len(names):
            with interrupts_deferred():
                shutil.rmtree(path)
    return materialize(base, path, base.release_path_upto, sdist, False)


def export(base: Base, drop_missing: bool = False) -> str:
    commits, dirty = fork_state(base, base.fork)
    if dirty:
        raise ForkError(f"{base.fork} has uncommitted changes; commit them in the fork, then export")
    old = read_series(base)
    _, changed_patches, _ = changes_since_sync(base, base.fork, commits)
    if changed_patches and commits != [(base.patches / n).read_text() for n in old]:
        raise ForkError(
            f"the series changed since the fork was made ({', '.join(changed_patches)}) and export would "
            f"overwrite that; run 'materialize' to bring the changes into the fork first"
        )
    if not commits:
        raise ForkError(
            f"{base.fork} has no commits since {base.tag}, so export would empty the series; "
            f"commit your work in the fork first, or run 'materialize' to rebuild it from the series"
        )
    on_upstream = built_on_upstream(base, base.fork)
    upstream_files = upstream_only_files(base, base.fork) if on_upstream else []
    with tempfile.TemporaryDirectory(dir=base.patches, prefix=".export-") as tmp:
        excluded = [".", *(f":(exclude){path}" for path in upstream_files)] if upstream_files else []
        names = format_patches(base, base.fork, Path(tmp), "HEAD", *excluded)
        if len(names) != len(commits):
            raise ForkError(
                f"a commit of {base.fork} changes only upstream's tests ({', '.join(upstream_files)}), which "
                f"the release lacks; fold it into the commit whose change it tests, then export"
            )
        edits = write_upstream_edits(base, base.fork, upstream_files, names, Path(tmp, UPSTREAM_EDITS))
        dropped = [name for name in old if name not in names]
        if len(commits) < len(old) and not drop_missing:
            prefix = commits == [(base.patches / name).read_text() for name in old[: len(commits)]]
            why = (
                f"the fork holds the first {count(commits, 'patch')} of the series' {len(old)} "
                f"(it was made with --upto, or its update did not finish)"
                if prefix else f"the fork holds {count(commits, 'commit')} and {base.series} {count(old, 'patch')}"
            )
            raise ForkError(
                f"{why}; run 'materialize' to bring it to the whole series, or pass --drop-missing "
                f"to delete {', '.join(dropped)} from {base.patches}"
            )
        Path(tmp, "series").write_text("".join(f"{n}\n" for n in names))
        # the series is written whole: Ctrl-C waits for the renames
        with interrupts_deferred():
            for name in [*names, "series"]:
                Path(tmp, name).replace(base.patches / name)
            for name in dropped:
                (base.patches / name).unlink()
            if on_upstream:
                # only a fork on upstream's release commit holds the edits to its tests
                folder = base.patches / UPSTREAM_EDITS
                for stale in folder.glob("*.patch") if folder.is_dir() else []:
                    if stale.name not in edits:
                        stale.unlink()
                for name in edits:
                    folder.mkdir(exist_ok=True)
                    Path(tmp, UPSTREAM_EDITS, name).replace(folder / name)
            write_sync_record(base.fork, sync_record(base, commits))
    if dropped:
        return (
            f"exported {count(names, 'patch')} to {base.patches}/ and deleted {', '.join(dropped)}: no "
            f"commit of the fork makes them now; 'git checkout -- FILE' brings one back"
        )
    return f"exported {count(names, 'patch')} to {base.patches}/"


@contextlib.contextmanager
def checked_series(base: Base, sdist: Path | None) -> Iterator[Path]:
    """The series applied to a pristine release in a temporary folder, once it
    is known to apply and to round-trip through export; yields that fork."""
    names = read_series(base)
    unlisted = sorted(p.name for p in base.patches.glob("*.patch") if p.name not in names)
    if unlisted:
        raise ForkError(f"{base.patches} holds files not in series: {', '.join(unlisted)}; add them to series or delete them")
    orphans = sorted(p.name for p in (base.patches / UPSTREAM_EDITS).glob("*.patch") if p.name not in names)
    if orphans:
        raise ForkError(
            f"{base.patches / UPSTREAM_EDITS} holds edits to upstream's tests for patches not in series: "
            f"{', '.join(orphans)}; rename each to its patch's new name, or delete it"
        )
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
        yield fork


def check(base: Base, sdist: Path | None) -> str:
    with checked_series(base, sdist):
        pass
    return (
        f"ok: the series ({count(read_series(base), 'patch')}) applies cleanly to pristine torchtitan "
        f"{base.version} and round-trips through export"
    )
