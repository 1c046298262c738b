"""Materialize, check, export, install and run the torchtitan GQA fork.

The product is the patch series in patches/ against the torchtitan 0.2.1 sdist.
This one CLI turns it into a git checkout at ./torchtitan (the release as the
base commit, one commit per patch) and writes edits made there back to patches/.

    python3 scripts/gqa_fork.py setup        # materialize + install + main job
    python3 scripts/gqa_fork.py test         # materialize + install + tests
    python3 scripts/gqa_fork.py materialize [--upto PATCH] [--dest DIR] [--sdist FILE] [--discard]
    python3 scripts/gqa_fork.py export | check | install | data | train
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import importlib.metadata
import json
import os
import re
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


def unpack(sdist: Path, dest: Path) -> None:
    prefix = f"torchtitan-{RELEASE}/"
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            if not member.name.startswith(prefix) or member.name.startswith(prefix + GENERATED_METADATA):
                continue
            member.name = member.name[len(prefix):]
            members.append(member)
        tar.extractall(dest, members=members, filter="data")


# -------------------------------------------------------------------- the fork


def fork_state(fork: Path) -> tuple[list[str], str]:
    """The fork's commits since the base as patch texts, and its uncommitted changes."""
    if not (fork / ".git").exists() or not git(fork, "tag", "--list", BASE_TAG).strip():
        raise ForkError(
            f"{fork} exists but is not a fork made by this tool (no git tag {BASE_TAG}); "
            f"move it away, or pass --discard to keep it as a backup folder and rebuild"
        )
    dirty = git(fork, "status", "--porcelain")
    with tempfile.TemporaryDirectory() as tmp:
        format_patches(fork, Path(tmp))
        texts = [p.read_text() for p in sorted(Path(tmp).glob("*.patch"))]
    return texts, dirty


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


def build_fork(dest: Path, names: list[str], sdist: Path | None) -> None:
    """Unpack the verified release next to dest, commit it, apply the series, then move it in place."""
    sdist = verified_sdist(sdist)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        unpack(sdist, staging)
        git(staging, "init", "--quiet", "--initial-branch=gqa")
        (staging / ".git" / "info" / "exclude").write_text(FORK_EXCLUDES)
        git(staging, "add", "--all")
        git(
            staging, "commit", "--quiet", "--no-verify",
            "-m", f"torchtitan {RELEASE} release from PyPI\n\nsdist sha256 {SDIST_SHA256}\n"
            f"{GENERATED_METADATA}/ is left out: setuptools rewrites it on every install.",
            env=RELEASE_IDENTITY,
        )
        git(staging, "tag", BASE_TAG)
        apply_patches(staging, names)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def materialize(dest: Path, upto: str | None, sdist: Path | None, discard: bool) -> str:
    names = select_patches(upto)
    if dest.exists() and discard:
        backup = dest.with_name(f"{dest.name}.backup-{time.strftime('%Y%m%d-%H%M%S')}")
        dest.rename(backup)
        print(f"kept the old {dest.name} as {backup}")
    if not dest.exists():
        build_fork(dest, names, sdist)
        return f"{dest}: {RELEASE} + {len(names)} patches"

    commits, dirty = fork_state(dest)
    if dirty:
        raise ForkError(
            f"{dest} has uncommitted changes; commit them and run 'export', "
            f"or pass --discard to keep the fork as a backup folder and rebuild"
        )
    series_texts = [(PATCHES / n).read_text() for n in read_series()]
    if commits != series_texts[: len(commits)]:
        raise ForkError(
            f"{dest} has commits that are not in patches/series; run 'export' to keep them, "
            f"or pass --discard to keep the fork as a backup folder and rebuild"
        )
    if commits == series_texts[: len(names)]:
        return f"{dest}: up to date ({RELEASE} + {len(names)} patches)"
    # Every commit is in the series, so moving the branch loses nothing.
    common = min(len(commits), len(names))
    git(dest, "reset", "--hard", "--quiet", f"HEAD~{len(commits) - common}")
    apply_patches(dest, names[common:])
    return f"{dest}: {RELEASE} + {len(names)} patches"


def export() -> str:
    commits, dirty = fork_state(FORK)
    if dirty:
        raise ForkError(f"{FORK} has uncommitted changes; commit them in the fork, then export")
    old = read_series() if SERIES.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        names = format_patches(FORK, Path(tmp))
        for name in names:
            shutil.copyfile(Path(tmp, name), PATCHES / name)
    for name in set(old) - set(names):
        (PATCHES / name).unlink()
    SERIES.write_text("".join(f"{n}\n" for n in names))
    return f"exported {len(names)} patches to {PATCHES}/"


def check(sdist: Path | None) -> str:
    names = read_series()
    unlisted = sorted(p.name for p in PATCHES.glob("*.patch") if p.name not in names)
    if unlisted:
        raise ForkError(f"patches/ holds files not in series: {', '.join(unlisted)}; add them to series or delete them")
    with tempfile.TemporaryDirectory() as tmp:
        fork = Path(tmp, "torchtitan")
        build_fork(fork, names, sdist)
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
        # Pinned: a bare "torch" would pull several GB of CUDA wheels onto a CPU machine.
        pip("install", TORCH_SPEC)
        torch_version = installed_version("torch")
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp, "constraints.txt")
        constraints.write_text(f"torch=={torch_version}\n")
        wanted = [] if installed_version("triton") else ["triton"]
        if not fork_is_installed():
            wanted += ["-e", str(FORK)]
        for tool in ("pytest", "tomli_w", "matplotlib"):
            if not installed_version(tool):
                wanted.append(tool)
        if wanted:
            pip("install", "--quiet", "-c", str(constraints), *wanted)
    return f"installed: torch {torch_version}, torchtitan from {FORK}"


def fork_is_installed() -> bool:
    try:
        dist = importlib.metadata.distribution("torchtitan")
    except importlib.metadata.PackageNotFoundError:
        return False
    direct_url = dist.read_text("direct_url.json")
    return bool(direct_url) and json.loads(direct_url).get("url") == FORK.as_uri()


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
    corpora = {
        # Short documents: several per training sequence (block_causal masks matter).
        "multi_doc": documents,
        # One long document: every training sequence lies inside it.
        "single_doc": [" ".join(documents)],
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
    proc = subprocess.run([sys.executable, "-m", "pytest", *args.pytest_args], cwd=ROOT)
    if proc.returncode != 0:
        raise ForkError(f"tests failed (pytest exit {proc.returncode}); see the report above")
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


def trainer_losses(fork: Path, config: Path, dump: Path, overrides: list[str]) -> list[float]:
    """Per-step losses of torchtitan's Trainer (one GPU) run from `fork`."""
    dump.mkdir(parents=True, exist_ok=True)
    log = dump / "train.log"
    env = fork_env(fork, ROOT / "tests" / "integration")
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
             "-m", "torchtitan.train", f"--job.config_file={config}", f"--job.dump_folder={dump}",
             *overrides],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())
    losses = [float(loss) for loss in re.findall(r"step:\s*\d+\s+loss:\s*(\S+)", text)]
    if proc.returncode != 0 or not losses:
        raise ForkError(f"the Trainer failed with {config.name} {' '.join(overrides)}; see {log}")
    return losses


def loss_table(losses: dict[str, list[float]]) -> str:
    names = list(losses)
    lines = ["| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for step in range(max(map(len, losses.values()))):
        cells = [f"{losses[n][step]:.4f}" if step < len(losses[n]) else "" for n in names]
        lines.append(f"| {step + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gqa_fork.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def sdist_option(p):
        p.add_argument("--sdist", type=Path, help=f"use this local {SDIST_NAME} instead of downloading it")

    p = sub.add_parser("materialize", help="build ./torchtitan from the release and the series")
    p.add_argument("--upto", help="stop after this patch (name or number, e.g. 0001)")
    p.add_argument("--dest", type=Path, default=FORK, help="where to put the fork (default ./torchtitan)")
    p.add_argument("--discard", action="store_true", help="move an existing fork to a backup folder and rebuild")
    sdist_option(p)
    p = sub.add_parser("export", help="write the fork's commits back to patches/")
    p = sub.add_parser("check", help="apply the series to a pristine release in a temporary folder")
    sdist_option(p)
    sub.add_parser("install", help="pip-install torch (if needed), triton and the fork (editable)")
    p = sub.add_parser("data", help="regenerate the bundled tokenizer and corpora in data/")
    p = sub.add_parser("train", help="the main job: a short Qwen3 training on each backend")
    p.add_argument("--steps", type=int, default=10)
    p = sub.add_parser("setup", help="materialize, install, then run the main job")
    p.add_argument("--steps", type=int, default=10)
    sdist_option(p)
    p = sub.add_parser("test", help="materialize the fork and the 0.2.1 path, install, run pytest")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed on to pytest")
    sdist_option(p)
    args = parser.parse_args(argv)

    try:
        match args.command:
            case "materialize":
                message = materialize(args.dest.resolve(), args.upto, args.sdist, args.discard)
            case "export":
                message = export()
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
