"""The tooling behind scripts/gqa_fork.py, one module per job:

- bases: the torchtitan releases the series are made for
- release: the release sdist, downloaded, verified, unpacked
- fork: materialize, export and check a fork (a git checkout: release + series)
- install: torch, triton, the fork and the test tools
- data: the bundled tokenizer and corpora
- runs: training runs (the model driven directly, torchtitan's Trainer) on GPU sets
- suites: the test suites that `test` runs
"""

import argparse


class ForkError(Exception):
    """A problem the user can fix; printed as one line, exit status 1."""


def last_line(output: str) -> str:
    """A failed process's last line of output, for a one-line error."""
    return (output.strip().splitlines() or ["no output"])[-1]


def positive_int(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, e.g. 10, not {text!r}")
    return int(text)
