"""Training agrees across attention backends and with the 0.2.1 code path.

On CPU the model, loss and optimizer are driven directly (scripts/train_steps.py),
since torchtitan's Trainer needs CUDA. On a GPU the real Trainer runs each
backend from a train config; the loss table is written to build/training_losses.md.
"""

import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
STEPS = 12
# bf16 autocast: the attention kernels (cuDNN, flex, FlashAttention varlen)
# round differently. On an H100 (torch 2.11), in three runs, the losses of
# correct runs stayed within 1.1e-4 of each other over the 12 steps; 0.2.1's
# varlen with the #2223 layout bug moved them by 3.3e-3 or more (16/8 heads), and
# 2.3e-2 (32/8). The bound sits between the two, with room on both sides; the
# configs' lr (3e-4) is low enough that no loss spike amplifies the rounding.
BF16_RTOL = 1e-3
# CPU float32, same kernel on both sides: only summation order may differ.
FP32_RTOL = 1e-5


def assert_losses_close(actual, expected, rtol):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert math.isfinite(a), f"step {step}: loss {a}"
        assert abs(a - e) <= rtol * abs(e), f"step {step}: {a} vs {e} (rtol {rtol})"


def max_relative_difference(actual, expected):
    return max(abs(a - e) / abs(e) for a, e in zip(actual, expected, strict=True))


def assert_trains(losses):
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 1.0, losses


# ------------------------------------------------------------------ CPU part


def test_cpu_sdpa_training_matches_the_release_path(cli):
    for heads in (["--n-heads=16", "--n-kv-heads=8"], ["--n-heads=32", "--n-kv-heads=8"]):
        series = cli.step_losses(cli.FORK, "--attn-type=sdpa", "--steps=5", *heads)
        release = cli.step_losses(cli.BASELINE, "--attn-type=sdpa", "--steps=5", *heads)
        assert_trains(series)
        assert_losses_close(series, release, FP32_RTOL)


def test_cpu_flex_forward_matches_the_release_path_and_sdpa(cli):
    args = ["--attn-type=flex", "--steps=2", "--forward-only", "--corpus=multi_doc"]
    series = cli.step_losses(cli.FORK, *args)
    assert_losses_close(series, cli.step_losses(cli.BASELINE, *args), FP32_RTOL)
    # one document per sequence: block_causal is plain causal
    single = cli.step_losses(cli.FORK, "--attn-type=flex", "--steps=1", "--forward-only")
    sdpa = cli.step_losses(cli.FORK, "--attn-type=sdpa", "--steps=1", "--forward-only")
    assert_losses_close(single, sdpa, FP32_RTOL)


def test_train_configs_load_and_name_existing_flavors(cli):
    """Every config parses with the fork's JobConfig and selects its backend."""
    code = (
        "import sys; from torchtitan.config import ConfigManager; "
        "from torchtitan.models.qwen3 import qwen3_args; "
        "c = ConfigManager().parse_args(['--job.config_file', sys.argv[1]]); "
        "print(qwen3_args[c.model.flavor].attn_type)"
    )
    import subprocess
    import sys

    for config in sorted((ROOT / "configs").glob("qwen3_*.toml")):
        out = subprocess.run(
            [sys.executable, "-c", code, str(config)], env=cli.fork_env(cli.FORK),
            capture_output=True, text=True, check=True, cwd=ROOT,
        ).stdout
        assert out.strip() == config.stem.rsplit("_", 1)[1], config.name


# ------------------------------------------------------------------ GPU part

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torchtitan's Trainer and varlen_attn need CUDA"
)
BACKEND_SUFFIX = {"sdpa": "", "flex": "_flex_attn", "varlen": "_varlen_attn"}
# (corpus, heads, backend, path). sdpa has no document mask, so it is left out
# on packed documents. The 0.2.1 path's varlen output has the #2223 layout bug:
# it is run on packed documents only, to show that the tolerance catches it.
RUNS = [
    (corpus, heads, backend, path)
    for corpus, heads in itertools.product(("single_doc", "multi_doc"), ("16q8kv", "32q8kv"))
    for backend, path in itertools.product(BACKEND_SUFFIX, ("series", "0.2.1"))
    if not (corpus == "single_doc" and path == "0.2.1" and backend == "varlen")
    and not (corpus == "multi_doc" and backend == "sdpa")
]
REFERENCE = {"single_doc": "sdpa series", "multi_doc": "flex series"}


def held_to(name, corpus):
    """The run that `name` ("<backend> <path>") is compared with: the 0.2.1 path's
    sdpa and flex with the series' own, all else with the corpus' reference."""
    backend, path = name.split()
    if path == "0.2.1" and backend != "varlen":
        return f"{backend} series"
    return REFERENCE[corpus]


@pytest.fixture(scope="module")
def trainer_losses(cli, tmp_path_factory):

    dump = tmp_path_factory.mktemp("trainer")
    forks = {"series": cli.FORK, "0.2.1": cli.BASELINE}

    def run(key):
        corpus, heads, backend, path = key
        return cli.trainer_losses(
            forks[path],
            ROOT / "configs" / "qwen3_debugmodel_sdpa.toml",
            dump / "-".join(key),
            [
                "--model.name=qwen3_gqa", f"--model.flavor={heads}{BACKEND_SUFFIX[backend]}",
                "--experimental.custom_import=gqa_flavors",
                f"--training.dataset_path={ROOT / 'data' / corpus}", f"--training.steps={STEPS}",
            ],
        )

    with ThreadPoolExecutor(max_workers=6) as pool:
        losses = dict(zip(RUNS, pool.map(run, RUNS)))
    report = Path(os.environ.get("GQA_REPORT_DIR", ROOT / "build")) / "training_losses.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    tables = []
    for corpus, heads in itertools.product(("single_doc", "multi_doc"), ("16q8kv", "32q8kv")):
        columns = {f"{b} {p}": l for (c, h, b, p), l in losses.items() if (c, h) == (corpus, heads)}
        spread = ", ".join(
            f"{name} vs {held_to(name, corpus)}: "
            f"{max_relative_difference(columns[name], columns[held_to(name, corpus)]):.1e}"
            for name in columns
            if held_to(name, corpus) != name
        )
        tables.append(f"### {corpus}, {heads}\n\n{cli.loss_table(columns)}\n\nlargest relative difference: {spread}\n")
    report.write_text(f"# Trainer losses ({torch.cuda.get_device_name()}, torch {torch.__version__})\n\n" + "\n".join(tables))
    print("\n" + report.read_text())
    return losses


@requires_cuda
@pytest.mark.parametrize("heads", ["16q8kv", "32q8kv"])
def test_backends_agree_on_single_document_sequences(trainer_losses, heads):
    sdpa = trainer_losses["single_doc", heads, "sdpa", "series"]
    assert_trains(sdpa)
    for backend in ("flex", "varlen"):
        assert_losses_close(trainer_losses["single_doc", heads, backend, "series"], sdpa, BF16_RTOL)


@requires_cuda
@pytest.mark.parametrize("heads", ["16q8kv", "32q8kv"])
def test_flex_and_varlen_agree_on_packed_documents(trainer_losses, heads):
    flex = trainer_losses["multi_doc", heads, "flex", "series"]
    assert_trains(flex)
    assert_losses_close(trainer_losses["multi_doc", heads, "varlen", "series"], flex, BF16_RTOL)


@requires_cuda
@pytest.mark.parametrize("key", [k for k in RUNS if k[3] == "0.2.1" and k[2] != "varlen"], ids="-".join)
def test_series_matches_the_release_path(trainer_losses, key):
    corpus, heads, backend, _ = key
    series = trainer_losses[corpus, heads, backend, "series"]
    assert_losses_close(series, trainer_losses[key], BF16_RTOL)


@requires_cuda
@pytest.mark.parametrize("heads", ["16q8kv", "32q8kv"])
def test_tolerance_catches_the_2223_layout_bug(trainer_losses, heads):
    """0.2.1's varlen output swaps heads and head_dim: the same comparison must fail."""
    flex = trainer_losses["multi_doc", heads, "flex", "series"]
    buggy = trainer_losses["multi_doc", heads, "varlen", "0.2.1"]
    assert max_relative_difference(buggy, flex) > BF16_RTOL
