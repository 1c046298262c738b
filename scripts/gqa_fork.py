"""Materialize, check, export, install and run the torchtitan GQA fork.

The product is the patch series in patches/ against the torchtitan 0.2.1 sdist.
This one CLI turns it into a git checkout at ./torchtitan (the release as the
base commit, one commit per patch) and writes edits made there back to patches/.
The work is done by the package scripts/gqa, one module per job.

    python3 scripts/gqa_fork.py setup        # materialize + install + main job
    python3 scripts/gqa_fork.py test         # materialize + install + tests
    python3 scripts/gqa_fork.py materialize [--upto PATCH] [--dest DIR] [--sdist FILE] [--discard] [--upstream CHECKOUT]
    python3 scripts/gqa_fork.py export [--drop-missing] | check | install | data | train
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gqa import ForkError, data, fork, install, runs, suites
from gqa.bases import BASES, DEFAULT, ROOT

DATA = ROOT / "data"
base = BASES[DEFAULT]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gqa_fork.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def sdist_option(p):
        p.add_argument("--sdist", type=Path, help=f"use this local {base.sdist_name} instead of downloading it")

    p = sub.add_parser("materialize", help="build ./torchtitan from the release and the series")
    p.add_argument("--upto", help="stop after this patch (name or number, e.g. 0001)")
    p.add_argument("--dest", type=Path, default=base.fork, help="where to put the fork (default ./torchtitan)")
    p.add_argument("--discard", action="store_true", help="move an existing fork to a backup folder and rebuild")
    p.add_argument("--upstream", type=Path, metavar="CHECKOUT",
                   help=f"base the series on this torchtitan git checkout's {base.tag} tag, not on the sdist")
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
                message = fork.materialize(base, args.dest.resolve(), args.upto, args.sdist, args.discard, args.upstream)
            case "export":
                message = fork.export(base, args.drop_missing)
            case "check":
                message = fork.check(base, args.sdist)
            case "install":
                message = install.install(base)
            case "data":
                message = data.make_data(DATA)
            case "train":
                message = runs.main_job(base, args.steps)
            case "setup":
                print(fork.materialize(base, base.fork, None, args.sdist, False))
                print(install.install(base))
                message = runs.main_job(base, args.steps)
            case "test":
                message = suites.run_tests(base, args.sdist, args.pytest_args)
    except ForkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
