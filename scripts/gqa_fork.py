"""Materialize, check, export, install and run the torchtitan GQA fork.

The product is the patch series in patches/<release>/ against torchtitan's
release sdists (0.2.1 by default; --base picks another). This one CLI turns a
series into a git checkout (./torchtitan for 0.2.1: the release as the base
commit, one commit per patch) and writes edits made there back to the series.
The work is done by the package scripts/gqa, one module per job.

    python3 scripts/gqa_fork.py setup        # materialize + install + main job
    python3 scripts/gqa_fork.py test         # materialize + install + tests
    python3 scripts/gqa_fork.py materialize [--upto PATCH] [--dest DIR] [--sdist FILE] [--discard] [--upstream CHECKOUT [--author 'NAME <EMAIL>']]
    python3 scripts/gqa_fork.py export [--drop-missing] | check | install | data | train
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from gqa import ForkError, data, fork, install, positive_int, runs, suites
from gqa.bases import BASES, DEFAULT, ROOT

DATA = ROOT / "data"


TORCH_NOTE = (
    "Each release gets a virtual environment of its own, build/venv-<release>, made by the tool; it sees "
    "the packages of the Python that runs the tool, and only what is missing is installed into it. "
    "torch: one the release supports is kept; otherwise the release's torch is installed ("
    + "; ".join(f"{base.version}: '{base.torch}'" for base in BASES.values())
    + f"; {DEFAULT}'s is GQA_FORK_TORCH where set, split as a shell would, e.g. on a CPU-only machine "
    "'torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu')"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gqa_fork.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, about, *, epilog=None, bases=tuple(BASES), default=DEFAULT):
        p = sub.add_parser(name, help=about, description=about, epilog=epilog)
        if bases:
            p.add_argument("--base", choices=bases, default=default,
                           help=f"the torchtitan release whose series to use (default {default or 'all'})")
        return p

    def sdist_option(p):
        p.add_argument("--sdist", type=Path, help="use this local torchtitan-<release>.tar.gz instead of downloading it")

    def steps_option(p):
        p.add_argument("--steps", type=positive_int, default=10, help="training steps per backend (default 10)")

    p = command("materialize", "build the fork (./torchtitan for 0.2.1, ./torchtitan-<release> for the "
                "others) from the release and the series")
    p.add_argument("--upto", help="stop after this patch (name or number, e.g. 0001)")
    p.add_argument("--dest", type=Path, help="where to put the fork (default: the base's, e.g. ./torchtitan)")
    p.add_argument("--discard", action="store_true", help="move an existing fork to a backup folder and rebuild")
    p.add_argument("--upstream", type=Path, metavar="CHECKOUT",
                   help="base the series on this torchtitan git clone's release tag (or release branch), not on the sdist")
    p.add_argument("--author", metavar="'NAME <EMAIL>'",
                   help="with --upstream: who the branch's commits say wrote them (default: your git config's "
                   "user.name and user.email, as the clone sees them)")
    sdist_option(p)
    p = command("export", "write the fork's commits back to the series")
    p.add_argument("--drop-missing", action="store_true",
                   help="let a fork with fewer commits than the series delete the patches it lacks")
    sdist_option(command("check", "apply the series to a pristine release in a temporary folder, check that it "
                         "round-trips through export, and run each commit's own tests at that commit"))
    command("install", "make the release's environment (build/venv-<release>) and pip-install into it what "
            "it lacks of torch, triton, the fork (editable for 0.2.1; the release's dependencies for the others), "
            "the release's test requirements and the test tools", epilog=TORCH_NOTE)
    command("data", "regenerate the bundled tokenizer and corpora in data/", bases=())
    # the main job trains the configs of the fork installed into Python
    trainable = tuple(version for version, base in BASES.items() if base.installed)
    steps_option(command(
        "train",
        "the main job: a short Qwen3 debugmodel training on every backend this machine supports, losses "
        "side by side (GPU: torchtitan's Trainer on sdpa, flex and varlen; CPU: sdpa trained directly, "
        "flex forward only, varlen skipped)",
        bases=trainable,
    ))
    p = command("setup", "materialize and install the fork, then run the main job (see 'train')",
                epilog=TORCH_NOTE, bases=trainable)
    steps_option(p)
    sdist_option(p)
    p = command(
        "test",
        "materialize and install the forks (and 0.2.1's release path), then run each fork's own tests, "
        "each commit's own tests at that commit and this repository's; other arguments go to pytest "
        "(test -k varlen)",
        epilog=TORCH_NOTE,
        default=None,
    )
    sdist_option(p)
    p.add_argument("--upstream", type=Path, metavar="CHECKOUT",
                   help="also run upstream's tests of the models, from this torchtitan git clone's release "
                   "commit, on the pristine release and on the fork (with --base)")
    args, pytest_args = parser.parse_known_args(argv)
    if args.command != "test" and pytest_args:
        parser.error(f"unrecognized arguments: {' '.join(pytest_args)}")
    if getattr(args, "author", None) is not None and args.upstream is None:
        parser.error("--author names who wrote the commits of an --upstream branch: pass --upstream too")
    if args.command == "test" and args.base is None and (args.sdist or args.upstream):
        parser.error("--sdist and --upstream name one release's: pass --base too")
    args.pytest_args = pytest_args[1:] if pytest_args[:1] == ["--"] else pytest_args
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = BASES[getattr(args, "base", None) or DEFAULT]
    try:
        if shutil.which("git") is None:
            raise ForkError("git is not installed (or not on PATH); install git, then run the command again")
        match args.command:
            case "materialize":
                dest = (args.dest or base.fork).resolve()
                message = fork.materialize(base, dest, args.upto, args.sdist, args.discard, args.upstream, args.author)
            case "export":
                message = fork.export(base, args.drop_missing)
            case "check":
                unmet = suites.unmet_requirement(base)
                if unmet:
                    raise ForkError(
                        f"'check' runs each commit's tests in {base.venv}, but {unmet}; "
                        f"run 'python3 scripts/gqa_fork.py install --base {base.version}' first"
                    )
                with fork.checked_series(base, args.sdist) as built:
                    print(f"the series applies to pristine torchtitan {base.version} and round-trips through export")
                    failed, report = suites.each_commit_passes_its_tests(base, built, [], skip_last=False)
                print(report)
                if failed:
                    raise ForkError(f"these commits fail their own tests: {'; '.join(failed)}; see the reports above")
                message = "ok: the series applies, round-trips, and every commit passes its own tests"
            case "install":
                message = install.install(base)
            case "data":
                message = data.make_data_in(BASES[DEFAULT], DATA)
            case "train":
                message = runs.main_job(base, args.steps)
            case "setup":
                print(fork.materialize(base, base.fork, None, args.sdist, False))
                print(install.install(base))
                message = runs.main_job(base, args.steps)
            case "test":
                bases = [base] if args.base else list(BASES.values())
                message = suites.run_tests(bases, args.sdist, args.pytest_args, args.upstream)
    except ForkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"interrupted: the forks and the series were left whole, as they were or updated; "
            f"run 'gqa_fork.py {args.command}' again to finish", file=sys.stderr,
        )
        return 130
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
