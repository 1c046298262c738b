"""The benchmark's report: made from the raw results alone, and its verdicts;
the one-GPU Trainer runs: their order, their limits and their inputs."""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RAW = sorted(DOCS.glob("benchmark-*.jsonl"))


def report(rows_by_file, out):
    for name, rows in rows_by_file.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run(
        [sys.executable, ROOT / "scripts" / "benchmark.py", "--report-only", "--out", out],
        check=True, capture_output=True,
    )
    return (out / "benchmark.md").read_text()


def committed_rows():
    return {raw.name: [json.loads(line) for line in raw.read_text().splitlines()] for raw in RAW}


def test_committed_report_is_made_from_the_committed_raw_results(tmp_path, benchmark_script):
    names = {raw.name for raw in RAW}
    measured = {f"benchmark-{part}.jsonl" for part in ("compiled", "flex", "sdpa", "varlen")}
    assert measured <= names <= set(benchmark_script.RAW_FILES)
    assert report(committed_rows(), tmp_path) == (DOCS / "benchmark.md").read_text()
    assert (tmp_path / "benchmark.png").stat().st_size > 0


def test_a_varlen_call_slower_than_the_floor_fails_its_target(tmp_path):
    rows = committed_rows()
    for row in rows["benchmark-varlen.jsonl"]:
        if (row["kind"], row["path"], row.get("variant"), row["heads"], row["seq_len"]) == (
            "attention", "series", "layer", "32/8", 8192
        ):
            row["ms"] *= 1.05
    text = report(rows, tmp_path)
    assert "- NOT met: varlen attention call within 2% of the kernel floor in time" in text
    assert "  - varlen 32/8 seq 8192: 1.05" in text
    assert "- met: varlen attention call memory within 1% of the kernel floor" in text


# ---- one GPU: torchtitan's Trainer at real sizes

# a model small enough to count its FLOPs by hand: 30 parameters, 20 of them
# in the embedding, one layer with one head of dimension 1
TINY = dict(dim=2, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=1, hidden_dim=4, vocab_size=10)


def one_gpu_row(flavor, path, kernel="builtin", **fields):
    """A raw row as measure_trainer_one_gpu writes it: 8 tokens a step, in
    documents of 3 and 5 tokens."""
    return dict(
        kind="trainer_1gpu", backend="varlen", flavor=flavor, seq_len=8, path=path, varlen_kernel=kernel,
        device="Test GPU, torch 2.11.0+cu130, 2026-12-07", command="python3 scripts/benchmark.py --parts trainer",
        gpu_gib=80.0, peak_flops=18300.0, tokenizer_vocab=447, model=TINY, overrides=[], warmup=3,
        document_lengths=[[3, 5]] * 13, **fields,
    )


def trained(tps, memory_gib=None, mfu_logged=None):
    steps = len(tps)
    return dict(seconds=60.0, error=None, oom=False, params=30, tps=tps, memory_gib=memory_gib or [1.0] * steps,
                loss=[1.0] * steps, tflops_logged=[0.0] * steps, mfu_logged=mfu_logged or [0.0] * steps)


def test_one_gpu_section_is_made_from_its_raw_rows(tmp_path):
    # warm-up steps far off: counted in, they would move the median to 80
    release_tps = [1, 1, 1] + [80] * 4 + [100] * 6
    rows = [
        one_gpu_row("1.7B", "0.2.1", **trained(release_tps, memory_gib=[12.5, 3.0, 3.0] + [3.0] * 10)),
        one_gpu_row("1.7B", "series", **trained([1, 1, 1] + [110] * 10, mfu_logged=[0.0] * 3 + [150.0] * 10)),
        one_gpu_row("1.7B", "series", "fa4", skipped="not installed", reason="flash-attn-4 is not installed"),
        one_gpu_row("4B", "0.2.1", **trained([]) | dict(error="torch.OutOfMemoryError: CUDA out of memory", oom=True)),
        one_gpu_row("4B", "series", skipped="time limit", reason="a run takes about 60 s; 10 s were left"),
    ]
    text = report({"benchmark-trainer-1gpu.jsonl": rows}, tmp_path)
    assert "## One GPU: torchtitan's Trainer at real sizes" in text
    assert "- Test GPU, torch 2.11.0+cu130, 2026-12-07, measured by `python3 scripts/benchmark.py --parts trainer`" in text
    table = {line.split(" | ")[0]: line.split(" | ") for line in text.splitlines() if line.startswith(("| 1.7B (", "| 4B ("))}
    # size | seq | documents | tokens/s x3 | peak GiB x3 | MFU % x3 | series / 0.2.1 | torchtitan's MFU
    small = table["| 1.7B (0.00B params, 1 layers, 1/1 heads)"]
    assert small[2] == "2, 5 tokens"
    assert small[3].startswith("100 ±") and small[4].startswith("110 ±0.0%") and small[5] == "not installed"
    assert small[6:9] == ["12.50", "1.00", "not installed"]
    # a step's FLOPs: 6 × (30 - 20) parameters × 8 tokens + 12 × (3·4/2 + 5·6/2) pairs
    # = 732; at 100 tokens/s a step takes 0.08 s: 9150 FLOP/s, 50% of the peak 18300
    assert small[9:12] == ["50.0", "55.0", "not installed"]
    assert small[12:] == ["1.100", "150.0 |"]
    big = table["| 4B (0.00B params, 1 layers, 1/1 heads)"]
    assert big[3:12] == ["OOM", "time limit", "-"] * 3
    assert "- 4B 8 0.2.1: torch.OutOfMemoryError: CUDA out of memory" in text
    assert "- 4B 8 series: a run takes about 60 s; 10 s were left" in text
    assert "- 1.7B 8 series FA4: flash-attn-4 is not installed" in text
    assert (tmp_path / "benchmark-trainer-1gpu.png").stat().st_size > 0


def trainer_log(flavor, steps):
    """A Trainer log as run_trainer returns it (colours removed)."""
    lines = [f"[rank0]:[titan] Model qwen3_gqa {flavor}_varlen_attn size: 30 total parameters"]
    lines += [f"[rank0]:[titan] step: {step:2}  loss: 9.0000  grad_norm:  1.0000  memory:  3.00GiB(3.75%)  "
              f"tps: 1,000  tflops: 0.01  mfu: 1.00%" for step in range(1, steps + 1)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def one_gpu(benchmark_script, tmp_path, monkeypatch):
    """measure_trainer on a one-GPU machine whose Trainer runs are stand-ins:
    run(fail=...) measures, and returns [(path, flavor, seq_len, kernel)] in the
    order the runs went; fail(path, flavor) may return a log to fail with."""
    inputs = dict(device="Test GPU", gpu_gib=80.0, peak_flops=1e15, fa4_missing=None, tokenizer_vocab=447, cases=[
        dict(flavor=flavor, seq_len=seq_len, model=TINY, document_lengths=[[seq_len]] * 13)
        for flavor, seq_len in benchmark_script.ONE_GPU_CASES
    ])
    monkeypatch.setattr(benchmark_script, "read_trainer_inputs", lambda: inputs)
    monkeypatch.setattr(benchmark_script.torch.cuda, "device_count", lambda: 1)
    forks = {fork: name for name, fork in benchmark_script.PATHS.items()}
    raw = tmp_path / benchmark_script.ONE_GPU_RAW

    def run(fail=lambda path, flavor: None, time_limit=None, stand_in=None):
        calls = []

        def run_trainer(base, fork, config, dump, overrides, nproc=1, gpus=None):
            assert (nproc, gpus, os.environ["PYTORCH_CUDA_ALLOC_CONF"]) == (1, "0", "expandable_segments:True")
            arguments = dict(o.removeprefix("--").split("=", 1) for o in overrides if "=" in o)
            flavor, seq_len = arguments["model.flavor"].removesuffix("_varlen_attn"), int(arguments["training.seq_len"])
            calls.append((forks[fork], flavor, seq_len, arguments.get("model.varlen_kernel", "builtin")))
            # the rows of the runs before this one are already in the raw results
            position = benchmark_script.one_gpu_runs().index(((flavor, seq_len), calls[-1][::3]))
            assert len(raw.read_text().splitlines()) == position
            if stand_in:
                stand_in()
            log = fail(forks[fork], flavor)
            if log is not None:
                dump.mkdir(parents=True, exist_ok=True)
                (dump / "train.log").write_text(log)
                raise benchmark_script.ForkError("the Trainer failed")
            return trainer_log(flavor, int(arguments["training.steps"]))

        monkeypatch.setattr(benchmark_script.runs, "run_trainer", run_trainer)
        args = argparse.Namespace(out=tmp_path, command="cmd", time_limit=time_limit,
                                  started=benchmark_script.time.monotonic())
        benchmark_script.measure_trainer(args)
        return calls

    run.inputs, run.raw = inputs, raw
    return run


def raw_rows(raw):
    return [json.loads(line) for line in raw.read_text().splitlines()]


def test_one_gpu_runs_go_most_important_first_and_fa4_last(one_gpu, tmp_path, capsys):
    (tmp_path / "benchmark-trainer.jsonl").write_text("earlier two-GPU rows\n")
    oom = "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB.\nChildFailedError:\n"
    calls = one_gpu(fail=lambda path, flavor: oom if (path, flavor) == ("series", "4B") else None)
    assert calls == [
        ("0.2.1", "1.7B", 8192, "builtin"), ("series", "1.7B", 8192, "builtin"),
        ("0.2.1", "4B", 8192, "builtin"), ("series", "4B", 8192, "builtin"),
        ("0.2.1", "1.7B", 32768, "builtin"), ("series", "1.7B", 32768, "builtin"),
        # FA4 last, and not where the series ran out of memory
        ("series", "1.7B", 8192, "fa4"), ("series", "1.7B", 32768, "fa4"),
    ]
    rows = raw_rows(one_gpu.raw)
    assert len(rows) == 9
    measured = rows[0]
    assert (measured["tps"], measured["memory_gib"], measured["params"]) == ([1000.0] * 13, [3.0] * 13, 30)
    assert measured["document_lengths"] == [[8192]] * 13 and measured["device"].startswith("Test GPU, torch ")
    series_4b = rows[3]
    assert series_4b["oom"]
    assert series_4b["error"] == "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB."
    assert (rows[7]["flavor"], rows[7]["varlen_kernel"], rows[7]["skipped"]) == ("4B", "fa4", "not run")
    out = capsys.readouterr().out
    assert "skipped the" in out and "two-GPU Trainer cases: this machine has 1 GPU" in out
    assert (tmp_path / "benchmark-trainer.jsonl").read_text() == "earlier two-GPU rows\n"


def test_fa4_is_not_run_where_flash_attn_4_cannot_run(one_gpu):
    one_gpu.inputs["fa4_missing"] = "flash-attn-4 is not installed"
    calls = one_gpu()
    assert [kernel for *_, kernel in calls] == ["builtin"] * 6
    fa4 = [r for r in raw_rows(one_gpu.raw) if r["varlen_kernel"] == "fa4"]
    assert [(r["skipped"], r["reason"]) for r in fa4] == [("not installed", "flash-attn-4 is not installed")] * 3


def test_one_gpu_runs_stop_at_the_time_limit(one_gpu):
    # the first run outlasts the limit: it is stopped then, and no other starts
    calls = one_gpu(time_limit=1.0, stand_in=lambda: subprocess.run(["sleep", "30"]),
                    fail=lambda path, flavor: "Terminated\n")
    assert calls == [("0.2.1", "1.7B", 8192, "builtin")]
    rows = raw_rows(one_gpu.raw)
    assert rows[0]["error"] == "stopped at --time-limit" and rows[0]["seconds"] < 20
    assert [r.get("skipped") for r in rows[1:]] == ["time limit"] * 8


def test_no_one_gpu_run_starts_that_would_end_past_the_time_limit(benchmark_script, one_gpu, monkeypatch):
    now = [1000.0]
    clock = SimpleNamespace(monotonic=lambda: now[0], strftime=time.strftime)
    monkeypatch.setattr(benchmark_script, "time", clock)

    def hundred_seconds():
        now[0] += 100

    calls = one_gpu(time_limit=250, stand_in=hundred_seconds)
    # 1.7B at 8k took 100 s, twice: a third run would end at 300 s
    assert calls == [("0.2.1", "1.7B", 8192, "builtin"), ("series", "1.7B", 8192, "builtin")]
    rows = raw_rows(one_gpu.raw)
    assert [r.get("skipped") for r in rows] == [None, None] + ["time limit"] * 7
    assert rows[2]["reason"] == "a run takes about 100 s; 50 s of --time-limit were left"


def test_trainer_inputs_are_the_documents_the_trainer_sees(benchmark_script):
    """On CPU, from the series fork: each step's documents fill its sequence,
    and the first ones are the corpus's first texts with BOS and EOS."""
    env = benchmark_script.runs.fork_env(benchmark_script.PATHS["series"], ROOT / "tests" / "integration")
    out = subprocess.run(
        [sys.executable, ROOT / "scripts" / "benchmark.py", "--trainer-inputs"], cwd=ROOT, capture_output=True,
        text=True, check=True, env=env,
    ).stdout
    inputs = json.loads(out.strip().splitlines()[-1])
    corpus = (ROOT / "data" / "multi_doc" / "train.jsonl").read_text().splitlines()
    tokenizer = Tokenizer.from_file(str(ROOT / "data" / "tokenizer" / "tokenizer.json"))
    first = [len(tokenizer.encode(json.loads(line)["text"]).ids) + 2 for line in corpus[:3]]
    assert [(c["flavor"], c["seq_len"]) for c in inputs["cases"]] == list(benchmark_script.ONE_GPU_CASES)
    for case in inputs["cases"]:
        lengths = case["document_lengths"]
        assert len(lengths) == benchmark_script.ONE_GPU_WARMUP + benchmark_script.ONE_GPU_MEASURED
        assert all(sum(step) == case["seq_len"] for step in lengths)
        assert lengths[0][:3] == first
        layers, heads = {"1.7B": (28, 16), "4B": (36, 32)}[case["flavor"]]
        assert (case["model"]["n_layers"], case["model"]["n_heads"], case["model"]["n_kv_heads"]) == (layers, heads, 8)
        assert case["model"]["vocab_size"] == 151936
    if torch.cuda.is_available():
        assert inputs["device"] == torch.cuda.get_device_name()
    else:
        assert inputs["device"] is None and inputs["fa4_missing"] == "no CUDA GPU"
