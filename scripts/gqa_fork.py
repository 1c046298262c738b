"""Materialize, check, export, install and run the torchtitan GQA fork.

The product is the patch series in patches/ against the torchtitan 0.2.1 sdist.
This one CLI turns it into a git checkout at ./torchtitan (the release as the
base commit, one commit per patch) and writes edits made there back to patches/.

    python3 scripts/gqa_fork.py setup        # materialize + install + main job
    python3 scripts/gqa_fork.py test         # materialize + install + tests
    python3 scripts/gqa_fork.py materialize [--upto PATCH] [--dest DIR] [--sdist FILE] [--discard] [--upstream CHECKOUT]
    python3 scripts/gqa_fork.py export [--drop-missing] | check | install | data | train
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import importlib.metadata
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "patches"
SERIES = PATCHES / "series"
FORK = ROOT / "torchtitan"
BUILD = ROOT / "build"
BASELINE = BUILD / "torchtitan-0.2.1-compat"
CONFIGS = ROOT / "configs"
DATA = ROOT / "data"

RELEASE = "0.2.1"
BASE_TAG = f"v{RELEASE}"
SDIST_NAME = f"torchtitan-{RELEASE}.tar.gz"
SDIST_SHA256 = "0b288bd9eb3d775f20ba00d9d71449023c8b224e356fa46744b94aa863217ca8"
# The base commit is reproducible: same tree, identity and date on every machine.
RELEASE_IDENTITY = {
    "GIT_AUTHOR_NAME": "PyTorch Team",
    "GIT_AUTHOR_EMAIL": "packages@pytorch.org",
    "GIT_AUTHOR_DATE": "2025-12-26T00:00:00+00:00",
    "GIT_COMMITTER_NAME": "PyTorch Team",
    "GIT_COMMITTER_EMAIL": "packages@pytorch.org",
    "GIT_COMMITTER_DATE": "2025-12-26T00:00:00+00:00",
}
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
# Left out of the base commit: setuptools rewrites it on every install.
GENERATED_METADATA = "torchtitan.egg-info"
FORK_EXCLUDES = f"__pycache__/\n*.pyc\n/{GENERATED_METADATA}/\n/outputs/\n/build/\n"
# In the fork's .git: the series' patches (name, sha256) as of the last
# materialize or export.
SYNC_RECORD = "gqa-fork-synced.json"

MIN_TORCH = (2, 11)
TORCH_SPEC = os.environ.get("GQA_FORK_TORCH", "torch==2.13.0")
BACKENDS = ("sdpa", "flex", "varlen")


class ForkError(Exception):
    """A problem the user can fix; printed as one line, exit status 1."""


# --------------------------------------------------------------------------- git


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


def read_series() -> list[str]:
    names = [
        line.strip()
        for line in SERIES.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name in names:
        if not (PATCHES / name).is_file():
            raise ForkError(f"patches/series lists {name}, which is not in patches/; restore it or remove the line")
    return names


def select_patches(upto: str | None) -> list[str]:
    names = read_series()
    if upto is None:
        return names
    for i, name in enumerate(names):
        if upto in (name, name.split("-", 1)[0], name.removesuffix(".patch")):
            return names[: i + 1]
    raise ForkError(f"--upto {upto!r} matches no patch in patches/series; use one of: {', '.join(names)}")


# ------------------------------------------------------------------------ sdist


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_sdist(sdist: Path | None) -> Path:
    """The release sdist, downloaded through pip if needed, its sha256 checked."""
    if sdist is None:
        sdist = BUILD / SDIST_NAME
        if not sdist.exists():
            download_sdist(sdist)
    if sdist.is_dir():
        raise ForkError(f"--sdist {sdist} is a folder; pass the path of the file {SDIST_NAME}")
    if not sdist.is_file():
        raise ForkError(f"sdist {sdist} does not exist; pass the path of {SDIST_NAME} or omit --sdist to download it")
    actual = sha256_of(sdist)
    if actual != SDIST_SHA256:
        raise ForkError(
            f"sha256 of {sdist} is {actual}, expected {SDIST_SHA256}; "
            f"delete it and download {SDIST_NAME} from PyPI again"
        )
    return sdist


def download_sdist(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        requirement = Path(tmp, "requirement.txt")
        requirement.write_text(f"torchtitan=={RELEASE} --hash=sha256:{SDIST_SHA256}\n")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
             "--require-hashes", "-r", str(requirement), "-d", tmp],
            capture_output=True, text=True,
        )
        downloaded = Path(tmp, SDIST_NAME)
        if proc.returncode != 0 or not downloaded.exists():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ForkError(f"could not download {SDIST_NAME} with pip ({tail}); check the network or pass --sdist FILE")
        shutil.move(downloaded, target)


def release_members(sdist: Path) -> dict[str, tarfile.TarInfo]:
    """The sdist's files by their path in the release, generated metadata left out."""
    prefix = f"torchtitan-{RELEASE}/"
    with tarfile.open(sdist) as tar:
        return {
            m.name[len(prefix):]: m for m in tar.getmembers()
            if m.name.startswith(prefix) and not m.name.startswith(prefix + GENERATED_METADATA)
        }


def unpack(sdist: Path, dest: Path) -> None:
    members = []
    for name, member in release_members(sdist).items():
        member.name = name
        members.append(member)
    # The archive's sha256 was checked; the data filter (Python 3.10.12+,
    # 3.11.4+) guards the extraction as well where this Python has it.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, members=members, **safe)


def touched_files(names: list[str]) -> set[str]:
    """The paths that these patches create, change or delete."""
    return {
        path
        for name in names
        for path in re.findall(r"^diff --git a/(\S+) b/", (PATCHES / name).read_text(), re.MULTILINE)
    }


def check_upstream_matches_release(upstream: Path, sdist: Path, names: list[str]) -> None:
    """Upstream's v0.2.1 must hold what the release holds in every file the series touches."""
    members = release_members(sdist)
    with tarfile.open(sdist) as tar:
        for path in sorted(touched_files(names)):
            release = tar.extractfile(members[path]).read() if path in members else None
            proc = subprocess.run(["git", "-C", upstream, "show", f"{BASE_TAG}:{path}"], capture_output=True)
            tagged = proc.stdout if proc.returncode == 0 else None
            if tagged != release:
                raise ForkError(
                    f"{upstream} at {BASE_TAG} differs from the PyPI release in {path}, which the series "
                    f"touches; check out upstream's own {BASE_TAG} tag there, or omit --upstream"
                )


# -------------------------------------------------------------------- the fork


def patch_digests(names: list[str]) -> list[list[str]]:
    return [[name, hashlib.sha256((PATCHES / name).read_bytes()).hexdigest()] for name in names]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def record_sync(fork: Path) -> None:
    """Remember the series as it is now: what the fork was last made from or
    exported to, so that later changes are known to be the fork's or patches/'s."""
    (fork / ".git" / SYNC_RECORD).write_text(json.dumps(patch_digests(read_series())) + "\n")


def last_sync(fork: Path) -> list[list[str]]:
    """The series as it was at the last materialize or export. A fork made
    before the record existed counts as made from the series as it is now."""
    record = fork / ".git" / SYNC_RECORD
    return json.loads(record.read_text()) if record.exists() else patch_digests(read_series())


def fork_state(fork: Path) -> tuple[list[str], str]:
    """The fork's commits since the base as patch texts, and its uncommitted changes."""
    if not fork.exists():
        raise ForkError(f"there is no fork at {fork}; run 'materialize' first")
    if not (fork / ".git").exists() or not git(fork, "tag", "--list", BASE_TAG).strip():
        raise ForkError(
            f"{fork} exists but is not a fork made by this tool (no git tag {BASE_TAG}); move it away, "
            f"or run 'materialize --discard' to keep it as a backup folder and rebuild"
        )
    dirty = git(fork, "status", "--porcelain")
    with tempfile.TemporaryDirectory() as tmp:
        format_patches(fork, Path(tmp))
        texts = [p.read_text() for p in sorted(Path(tmp).glob("*.patch"))]
    return texts, dirty


def changes_since_sync(fork: Path, commits: list[str]) -> tuple[bool, list[str]]:
    """Whether the fork has commits that were not in the series at the last
    sync, and the patches of patches/ that changed since then."""
    synced = last_sync(fork)
    fork_changed = [text_digest(c) for c in commits] != [digest for _, digest in synced[: len(commits)]]
    current = patch_digests(read_series())
    changed_patches = [name for name, digest in current if [name, digest] not in synced]
    changed_patches += [name for name, _ in synced if name not in dict(current)]
    return fork_changed, changed_patches


def format_patches(fork: Path, out: Path) -> list[str]:
    git(
        fork, *FORMAT_PATCH_CONFIG, "format-patch", "--zero-commit", "--no-signature",
        "--full-index", "--no-numbered", "-o", str(out), f"{BASE_TAG}..HEAD",
    )
    return sorted(p.name for p in out.glob("*.patch"))


def apply_patches(fork: Path, names: list[str]) -> None:
    """git am each patch; on failure roll the fork back to where it was."""
    start = git(fork, "rev-parse", "HEAD").strip()
    for name in names:
        proc = subprocess.run(
            ["git", "am", "--keep-non-patch", "--committer-date-is-author-date", "--quiet", str(PATCHES / name)],
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


def commit_release(staging: Path, sdist: Path) -> None:
    """The verified release as the base commit of a new repository."""
    unpack(sdist, staging)
    git(staging, "init", "--quiet", "--initial-branch=gqa")
    git(staging, "add", "--all")
    git(
        staging, "commit", "--quiet", "--no-verify",
        "-m", f"torchtitan {RELEASE} release from PyPI\n\nsdist sha256 {SDIST_SHA256}\n"
        f"{GENERATED_METADATA}/ is left out: setuptools rewrites it on every install.",
        env=RELEASE_IDENTITY,
    )
    git(staging, "tag", BASE_TAG)


def check_out_upstream(staging: Path, upstream: Path, sdist: Path, names: list[str]) -> None:
    """Upstream's own v0.2.1 commit as the base, so that the branch shares its history."""
    if git(upstream, "rev-parse", "--verify", "--quiet", f"{BASE_TAG}^{{commit}}", check=False).strip() == "":
        raise ForkError(
            f"{upstream} has no tag {BASE_TAG}; fetch upstream's tags there "
            f"(git -C {upstream} fetch --tags) or omit --upstream"
        )
    check_upstream_matches_release(upstream, sdist, names)
    git(staging.parent, "clone", "--quiet", "--no-checkout", str(upstream.resolve()), str(staging))
    git(staging, "checkout", "--quiet", "-b", "gqa", BASE_TAG)


def build_fork(dest: Path, names: list[str], sdist: Path | None, upstream: Path | None = None) -> Path:
    """The release (or upstream's v0.2.1) plus the patches, built in a new
    folder beside dest; the caller moves it in place."""
    sdist = verified_sdist(sdist)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        if upstream is None:
            commit_release(staging, sdist)
        else:
            check_out_upstream(staging, upstream, sdist, names)
        (staging / ".git" / "info" / "exclude").write_text(FORK_EXCLUDES)
        apply_patches(staging, names)
        record_sync(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def backup_name(dest: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidates = (dest.with_name(f"{dest.name}.backup-{stamp}{f'-{n}' if n else ''}") for n in itertools.count())
    return next(c for c in candidates if not c.exists())


def materialize(
    dest: Path, upto: str | None, sdist: Path | None, discard: bool, upstream: Path | None = None
) -> str:
    names = select_patches(upto)
    if sdist is not None:
        verified_sdist(sdist)
    if not dest.exists() or discard or upstream is not None:
        if dest.exists() and not discard:
            raise ForkError(
                f"{dest} exists; --upstream builds a new fork: pass --discard too "
                f"to keep the old one as a backup folder"
            )
        built = build_fork(dest, names, sdist, upstream)
        if dest.exists():
            backup = backup_name(dest)
            dest.rename(backup)
            print(f"kept the old {dest.name} as {backup}")
        built.rename(dest)
        base = f"upstream {BASE_TAG} from {upstream}" if upstream else RELEASE
        return f"{dest}: {base} + {len(names)} patches"

    commits, dirty = fork_state(dest)
    if dirty:
        raise ForkError(
            f"{dest} has uncommitted changes; commit them and run 'export', "
            f"or pass --discard to keep the fork as a backup folder and rebuild"
        )
    fork_changed, changed_patches = changes_since_sync(dest, commits)
    if fork_changed and changed_patches:
        raise ForkError(
            f"both {dest} (commits not in the series) and patches/ ({', '.join(changed_patches)}) changed "
            f"since the fork was made; run 'materialize --discard' to rebuild from patches/ "
            f"(the fork is kept as a backup folder) and carry your commits over from the backup"
        )
    if fork_changed:
        raise ForkError(
            f"{dest} has commits that are not in patches/series; run 'export' to keep them, "
            f"or pass --discard to keep the fork as a backup folder and rebuild"
        )
    wanted = [(PATCHES / n).read_text() for n in names]
    if commits == wanted:
        return f"{dest}: up to date ({RELEASE} + {len(names)} patches)"
    # Every commit is one the series had, so moving the branch loses nothing.
    common = next((i for i, (a, b) in enumerate(zip(commits, wanted)) if a != b), min(len(commits), len(wanted)))
    git(dest, "reset", "--hard", "--quiet", f"HEAD~{len(commits) - common}")
    apply_patches(dest, names[common:])
    record_sync(dest)
    updated = f" (patches/ changed: {', '.join(changed_patches)})" if changed_patches else ""
    return f"{dest}: {RELEASE} + {len(names)} patches{updated}"


def export(drop_missing: bool = False) -> str:
    commits, dirty = fork_state(FORK)
    if dirty:
        raise ForkError(f"{FORK} has uncommitted changes; commit them in the fork, then export")
    old = read_series()
    _, changed_patches = changes_since_sync(FORK, commits)
    if changed_patches and commits != [(PATCHES / n).read_text() for n in old]:
        raise ForkError(
            f"patches/ changed since the fork was made ({', '.join(changed_patches)}) and export would "
            f"overwrite that; run 'materialize' to bring the changes into the fork first"
        )
    if len(commits) < len(old) and not drop_missing:
        raise ForkError(
            f"the fork holds {len(commits)} commits and patches/series {len(old)} patches (was it made "
            f"with --upto?); run 'materialize' to bring it to the whole series, or pass --drop-missing "
            f"to delete the patches it lacks from patches/"
        )
    with tempfile.TemporaryDirectory() as tmp:
        names = format_patches(FORK, Path(tmp))
        for name in names:
            shutil.copyfile(Path(tmp, name), PATCHES / name)
    for name in set(old) - set(names):
        (PATCHES / name).unlink()
    SERIES.write_text("".join(f"{n}\n" for n in names))
    record_sync(FORK)
    return f"exported {len(names)} patches to {PATCHES}/"


def check(sdist: Path | None) -> str:
    names = read_series()
    unlisted = sorted(p.name for p in PATCHES.glob("*.patch") if p.name not in names)
    if unlisted:
        raise ForkError(f"patches/ holds files not in series: {', '.join(unlisted)}; add them to series or delete them")
    with tempfile.TemporaryDirectory() as tmp:
        fork = build_fork(Path(tmp, "torchtitan"), names, sdist)
        out = Path(tmp, "exported")
        out.mkdir()
        exported = format_patches(fork, out)
        drift = [n for n in names if n not in exported or not filecmp.cmp(out / n, PATCHES / n, shallow=False)]
    if drift or exported != names:
        raise ForkError(
            f"patches apply but are not in exported form ({', '.join(drift or exported)}); "
            f"materialize the fork and run 'export'"
        )
    return f"ok: {len(names)} patches apply cleanly to pristine torchtitan {RELEASE} and round-trip through export"


# --------------------------------------------------------------------- install


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


def install() -> str:
    """Install torch (kept if suitable), triton, the fork (editable) and test tools."""
    if not FORK.exists():
        raise ForkError(f"{FORK} does not exist; run 'materialize' first")
    torch_version = installed_version("torch")
    if torch_version is None or tuple(int(x) for x in re.findall(r"\d+", torch_version)[:2]) < MIN_TORCH:
        # Pinned: a bare "torch" would pull the newest release's CUDA wheels.
        pip("install", *shlex.split(TORCH_SPEC))
        torch_version = installed_version("torch")
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp, "constraints.txt")
        constraints.write_text(f"torch=={torch_version}\n")
        wanted = [] if installed_version("triton") else ["triton"]
        if not fork_imports_from_root():
            # compat: a path entry for the checkout, which outranks the checkout
            # folder ./torchtitan that Python finds first from the repository root
            wanted += ["--config-settings", "editable_mode=compat", "-e", str(FORK)]
        for tool in ("pytest", "matplotlib"):
            if not installed_version(tool):
                wanted.append(tool)
        if wanted:
            pip("install", "--quiet", "-c", str(constraints), *wanted)
    if not fork_imports_from_root():
        raise ForkError(f"from {ROOT}, 'import torchtitan' does not load {FORK}; see pip's output above")
    return f"installed: torch {torch_version}, torchtitan from {FORK}"


def fork_imports_from_root() -> bool:
    """Whether `import torchtitan`, run from the repository root as the configs'
    commands are, loads the fork's package rather than the checkout folder."""
    proc = subprocess.run(
        [sys.executable, "-c", "import torchtitan; print(torchtitan.__file__)"],
        cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True, text=True,
    )
    return proc.stdout.strip() == str(FORK / "torchtitan" / "__init__.py")


# ------------------------------------------------------------------------ data

WORDS = {
    "det": ["the", "a", "every", "one", "no", "this", "that"],
    "adj": ["small", "red", "quiet", "old", "bright", "heavy", "green", "quick", "cold", "tall"],
    "noun": ["cat", "river", "engine", "garden", "teacher", "window", "storm", "bridge", "letter", "forest"],
    "verb": ["sees", "moves", "builds", "follows", "paints", "opens", "carries", "finds", "hears", "leaves"],
    "adv": ["slowly", "often", "again", "today", "quietly", "never", "early", "together"],
}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TOKENIZER_CONFIG = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|end_of_text|>",
    "add_bos_token": False,
    "add_eos_token": False,
}


def sentence(rng) -> str:
    """A sentence from a small grammar, or a counting run: text a tiny model can learn."""
    if rng.random() < 0.2:
        start = rng.randrange(10)
        return " ".join(NUMBERS[(start + i) % 10] for i in range(rng.randint(3, 8))) + "."
    w = {k: rng.choice(v) for k, v in WORDS.items()}
    obj = f"{rng.choice(WORDS['det'])} {rng.choice(WORDS['adj'])} {rng.choice(WORDS['noun'])}"
    return f"{w['det'].capitalize()} {w['adj']} {w['noun']} {w['verb']} {obj} {w['adv']}."


def make_data(out: Path) -> str:
    """Write the bundled tokenizer and two corpora; the same bytes on every run."""
    import random

    from tokenizers import decoders, models, pre_tokenizers, trainers, Tokenizer

    rng = random.Random(0)
    documents = [" ".join(sentence(rng) for _ in range(rng.randint(4, 60))) for _ in range(1500)]
    quarter = len(documents) // 4
    corpora = {
        # Short documents: several per training sequence (block_causal masks matter).
        "multi_doc": documents,
        # Four long documents, one or more for every data-parallel rank: the
        # sequences of a short run lie inside one, so causal and block_causal
        # masks agree.
        "single_doc": [" ".join(documents[i : i + quarter]) for i in range(0, len(documents), quarter)],
    }
    for name, texts in corpora.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "train.jsonl").open("w") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=[TOKENIZER_CONFIG["bos_token"], TOKENIZER_CONFIG["eos_token"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    folder = out / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    return f"wrote {out}/: tokenizer (vocab {tokenizer.get_vocab_size()}), {len(documents)} documents"


# -------------------------------------------------------------------- commands


def cmd_setup(args) -> str:
    print(materialize(FORK, None, args.sdist, False))
    print(install())
    return cmd_train(args)


def materialize_baseline(sdist: Path | None) -> str:
    """The 0.2.1 path: the release plus the series' first patch. It is derived
    from patches/ alone, so once that patch changes the old build is replaced."""
    first = read_series()[0]
    if BASELINE.exists():
        commits, dirty = fork_state(BASELINE)
        if dirty:
            raise ForkError(
                f"{BASELINE} has uncommitted changes, but it is rebuilt from patches/; "
                f"make your changes in {FORK} instead"
            )
        if commits != [(PATCHES / first).read_text()]:
            shutil.rmtree(BASELINE)
    return materialize(BASELINE, first, sdist, False)


def cmd_test(args) -> str:
    print(materialize(FORK, None, args.sdist, False))
    print(materialize_baseline(args.sdist))
    print(install())
    # the fork's tests from its root, as upstream runs them; then this repository's
    exits = {
        name: subprocess.run([sys.executable, "-m", "pytest", "-ra", *args.pytest_args], cwd=folder).returncode
        for name, folder in (("the fork's tests", FORK), ("the tooling and training tests", ROOT))
    }
    # 5: no test matched the pytest arguments in that folder
    failed = [f"{name} (pytest exit {code})" for name, code in exits.items() if code not in (0, 5)]
    if failed or set(exits.values()) == {5}:
        raise ForkError(f"tests failed: {', '.join(failed) or 'no test matched'}; see the reports above")
    return "tests passed"


def cmd_train(args) -> str:
    """The main job: Qwen3 debugmodel on every backend this machine can train."""
    import torch

    if torch.cuda.is_available():
        with tempfile.TemporaryDirectory() as tmp:
            losses = {
                backend: trainer_losses(
                    FORK, CONFIGS / f"qwen3_debugmodel_{backend}.toml", Path(tmp) / backend,
                    [f"--training.steps={args.steps}"],
                )
                for backend in BACKENDS
            }
        print(loss_table(losses))
        return f"trained Qwen3 debugmodel with torchtitan's Trainer on {', '.join(BACKENDS)}"
    losses = {"sdpa": step_losses(FORK, "--attn-type=sdpa", f"--steps={args.steps}")}
    flex = step_losses(FORK, "--attn-type=flex", "--steps=1", "--forward-only")
    print(loss_table(losses))
    print(f"flex, forward only at the initial weights: {flex[0]:.4f} (sdpa: {losses['sdpa'][0]:.4f})")
    return (
        "no CUDA device: trained sdpa with the model, loss and optimizer driven directly "
        "(torchtitan's Trainer needs CUDA); skipped flex training (flex_attention has no "
        "backward on CPU) and varlen (varlen_attn is a CUDA kernel)"
    )


def fork_env(fork: Path, *extra_paths: Path) -> dict:
    """The environment for a process that must import this fork's torchtitan."""
    paths = [str(fork), *map(str, extra_paths), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def step_losses(fork: Path, *args: str) -> list[float]:
    """Losses of scripts/train_steps.py run against `fork`."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_steps.py"), *args],
        env=fork_env(fork), capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise ForkError(f"train_steps.py {' '.join(args)} failed with {fork}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["losses"]


def run_trainer(
    fork: Path, config: Path, dump: Path, overrides: list[str], nproc: int = 1, gpus: str | None = None
) -> str:
    """torchtitan's Trainer run from `fork` on `nproc` GPUs (those of
    CUDA_VISIBLE_DEVICES `gpus`, if given); its log, also at dump/train.log."""
    dump.mkdir(parents=True, exist_ok=True)
    log = dump / "train.log"
    env = fork_env(fork, ROOT / "tests" / "integration")
    # NVLink multicast off: on shared hosts it can take the GPUs out of service
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
             # rank 0's log: every rank logs the same step metrics
             "--tee=3", "--local-ranks-filter=0",
             "-m", "torchtitan.train", f"--job.config_file={config}", f"--job.dump_folder={dump}",
             *overrides],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0:
        raise ForkError(f"the Trainer failed with {config.name} {' '.join(overrides)}; see {log}")
    return re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())


def trainer_metric(log: str, name: str) -> list[float]:
    """One of the per-step metrics the Trainer logs: loss, memory (GiB reserved) or tps."""
    values = re.findall(rf"step:\s*\d+\s.*?{name}:\s*([\d.,]+)", log)
    return [float(value.replace(",", "")) for value in values]


def trainer_losses(*args, **kwargs) -> list[float]:
    """Per-step losses of run_trainer(*args, **kwargs)."""
    losses = trainer_metric(run_trainer(*args, **kwargs), "loss")
    if not losses:
        raise ForkError(f"the Trainer logged no loss; see {args[2] / 'train.log'}")
    return losses


def loss_table(losses: dict[str, list[float]]) -> str:
    names = list(losses)
    lines = ["| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for step in range(max(map(len, losses.values()))):
        cells = [f"{losses[n][step]:.4f}" if step < len(losses[n]) else "" for n in names]
        lines.append(f"| {step + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gqa_fork.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def sdist_option(p):
        p.add_argument("--sdist", type=Path, help=f"use this local {SDIST_NAME} instead of downloading it")

    p = sub.add_parser("materialize", help="build ./torchtitan from the release and the series")
    p.add_argument("--upto", help="stop after this patch (name or number, e.g. 0001)")
    p.add_argument("--dest", type=Path, default=FORK, help="where to put the fork (default ./torchtitan)")
    p.add_argument("--discard", action="store_true", help="move an existing fork to a backup folder and rebuild")
    p.add_argument("--upstream", type=Path, metavar="CHECKOUT",
                   help=f"base the series on this torchtitan git checkout's {BASE_TAG} tag, not on the sdist")
    sdist_option(p)
    p = sub.add_parser("export", help="write the fork's commits back to patches/")
    p.add_argument("--drop-missing", action="store_true",
                   help="let a fork with fewer commits than the series delete the patches it lacks")
    p = sub.add_parser("check", help="apply the series to a pristine release in a temporary folder")
    sdist_option(p)
    sub.add_parser("install", help="pip-install torch (if needed), triton and the fork (editable)")
    p = sub.add_parser("data", help="regenerate the bundled tokenizer and corpora in data/")
    p = sub.add_parser("train", help="the main job: a short Qwen3 training on each backend")
    p.add_argument("--steps", type=int, default=10)
    p = sub.add_parser("setup", help="materialize, install, then run the main job")
    p.add_argument("--steps", type=int, default=10)
    sdist_option(p)
    about = "materialize the fork and the 0.2.1 path, install, run pytest; other arguments go to pytest (test -k varlen)"
    p = sub.add_parser("test", help=about, description=about)
    sdist_option(p)
    args, pytest_args = parser.parse_known_args(argv)
    if args.command != "test" and pytest_args:
        parser.error(f"unrecognized arguments: {' '.join(pytest_args)}")
    args.pytest_args = pytest_args[1:] if pytest_args[:1] == ["--"] else pytest_args
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        match args.command:
            case "materialize":
                message = materialize(args.dest.resolve(), args.upto, args.sdist, args.discard, args.upstream)
            case "export":
                message = export(args.drop_missing)
            case "check":
                message = check(args.sdist)
            case "install":
                message = install()
            case "data":
                message = make_data(DATA)
            case "train":
                message = cmd_train(args)
            case "setup":
                message = cmd_setup(args)
            case "test":
                message = cmd_test(args)
    except ForkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
