"""Memory and speed of GQA attention: the 0.2.1 path vs the series vs the kernel floor.

Each backend is measured in both forks, one after the other, each in a worker
process with that fork first on PYTHONPATH (both are packages named torchtitan).
The raw results go to docs/benchmark-<backend>.jsonl; the report (docs/benchmark.md)
and its plot (docs/benchmark.png) are made from all of them, so one backend can be
measured again with --backends:

    python3 scripts/gqa_fork.py materialize && python3 scripts/gqa_fork.py install
    python3 scripts/gqa_fork.py materialize --upto 0001 --dest build/torchtitan-0.2.1-compat
    build/venv-0.2.1/bin/python scripts/benchmark.py [--backends sdpa varlen flex] [--seq-lens 4096 ...] [--out docs]

(the workers run in build/venv-0.2.1, the environment that `install` makes)

Attention call: each fork's own Qwen3 `Attention.forward` from q/k/v to the
output, with the projections returning prepared tensors and RoPE, q/k norm and
wo switched off, so what is timed is the layout code and the backend arm.
Floor: the bare kernel on pre-packed q/k/v with n_kv_heads.
Training step: Qwen3Model with a real size's widths and head counts; also
compiled per block, and with per-op SAC, as the Trainer applies them
(--parts compiled, one GPU per worker, several GPUs at once).
Trainer (--parts trainer): torchtitan's own Trainer, first on one GPU at real
sizes (Qwen3 1.7B and 4B, compiled, per-op SAC, varlen on packed documents; the
0.2.1 path, the series, and the series on FlashAttention-4 where flash-attn-4
is installed), then on GPU pairs: FSDP, TP (KV heads sharded and replicated)
and CP, skipped where the machine has one GPU. `--time-limit` keeps the
one-GPU runs within one call of a GPU machine:

    python3 scripts/benchmark.py --parts trainer --time-limit 540
"""

import argparse
import inspect
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention
from torch.nn.attention.varlen import varlen_attn
from torch.profiler import profile, ProfilerActivity

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from gqa import ForkError, last_line, runs  # noqa: E402
from gqa.bases import BASES, DEFAULT  # noqa: E402

BASE = BASES[DEFAULT]
PATHS = {"0.2.1": BASE.release_path, "series": BASE.fork}
# (query heads, KV heads) -> the Qwen3 flavor with those heads, and how many of
# its layers the training step keeps so that it fits one 80 GB GPU
LAYOUTS = {(16, 8): ("0.6B", 28), (32, 8): ("4B", 15), (64, 8): ("32B", 4)}
BACKENDS = ("sdpa", "varlen", "flex")
DOCUMENTS = 4
# GPU sleeps longer than the CPU takes to launch one call (about 5 ms on an
# H100) and one training step (about 50 ms)
SLEEP_CYCLES = {"attention": 10_000_000, "step": 100_000_000}
STEP_SEQ_LEN = 8192
EOS_ID = 0
# SDPA ops as the profiler names them, by the kernel they run
SDPA_KERNELS = {
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_attention_math": "math",
}


def measure(fn, sleep_cycles, repeats=10, warmup=3):
    """GPU time of `fn` (median ms of `repeats` CUDA-event timings, and all of them),
    and the peak bytes of one more call: absolute, and above what was allocated before it.

    Each timed call is queued behind a GPU sleep, so the CPU has launched its kernels
    before the start event is reached: the time is the GPU's, as in training, where
    the CPU runs ahead of the GPU."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(sleep_cycles)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"ms": statistics.median(times), "times": times, "peak_bytes": peak, "call_bytes": peak - base}


def sdpa_kernels(fn):
    """The SDPA kernels that one call of `fn` runs, from the profiler's op names."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({SDPA_KERNELS[e.key] for e in prof.key_averages() if e.key in SDPA_KERNELS})


def documents(seq_len):
    """One row of `seq_len` random tokens holding DOCUMENTS documents of equal length."""
    tokens = torch.randint(1, 1000, (1, seq_len), device="cuda")
    tokens[0, torch.arange(1, DOCUMENTS + 1) * seq_len // DOCUMENTS - 1] = EOS_ID
    return tokens


class Given(torch.nn.Module):
    """Stands in for a projection: returns a prepared tensor whatever its input."""

    def __init__(self, tensor):
        super().__init__()
        self.tensor = tensor

    def forward(self, x):
        return self.tensor


def attention_call(model_module, args, seq_len, masks):
    """This fork's Attention.forward, fed prepared q/k/v, with q/k norm and wo off
    (args.qk_norm is False; RoPE is switched off by the caller)."""
    attention = model_module.Attention(args)
    bs, seqlen = 1, seq_len
    x = torch.empty(bs, seqlen, args.dim, device="meta")  # only its shape is read
    widths = {"wq": args.n_heads, "wk": args.n_kv_heads, "wv": args.n_kv_heads}
    for name, heads in widths.items():
        # (bs, seqlen, heads * head_dim), as the projection returns it
        tensor = torch.randn(bs, seqlen, heads * args.head_dim, device="cuda", dtype=torch.bfloat16)
        setattr(attention, name, Given(tensor.requires_grad_()))
    attention.wo = torch.nn.Identity()
    grad = torch.randn(bs, seqlen, args.n_heads * args.head_dim, device="cuda", dtype=torch.bfloat16)
    return lambda: attention(x, None, masks).backward(grad)


def kernel_floor(backend, args, seq_len, masks):
    """The bare kernel, forward + backward, on q/k/v in the layout it takes: packed
    documents for varlen; for SDPA and flex, the (bs, heads, seqlen, head_dim) view of
    the projections' (bs, seqlen, heads, head_dim) output, whose strides they take."""
    from torchtitan.models.attention import FlexAttentionWrapper, ScaledDotProductAttentionWrapper

    scale = args.head_dim**-0.5

    def tensors(transpose):
        """Leaf q, k, v from (1, seq_len, heads, head_dim) storage."""
        stored = [
            torch.randn(1, seq_len, heads, args.head_dim, device="cuda", dtype=torch.bfloat16)
            for heads in (args.n_heads, args.n_kv_heads, args.n_kv_heads)
        ]
        views = [t.transpose(1, 2) if transpose else t.flatten(0, 1) for t in stored]
        return [view.requires_grad_() for view in views]

    match backend:
        case "varlen":
            # (seq_len, heads, head_dim): the documents back to back
            q, k, v = tensors(transpose=False)
            gqa = {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}
            call = lambda: varlen_attn(  # noqa: E731
                q, k, v, masks.cu_seq_q, masks.cu_seq_k, masks.max_q, masks.max_k,
                scale=scale, window_size=(-1, 0), **gqa,
            )
        case "sdpa":
            # (1, heads, seq_len, head_dim), the backends in the wrapper's order
            q, k, v = tensors(transpose=True)
            backends = ScaledDotProductAttentionWrapper().sdpa_backends

            def call():
                with sdpa_kernel(backends, set_priority=True):
                    return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True, enable_gqa=True)

        case "flex":
            # flex_attention compiled as the wrapper compiles it
            q, k, v = tensors(transpose=True)
            compiled = FlexAttentionWrapper._compiled_flex_attn
            call = lambda: compiled(q, k, v, block_mask=masks, scale=scale, enable_gqa=True)  # noqa: E731
    grad = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    return lambda: call().backward(grad)


def training_step(model_cls, args, tokens, masks, variant=None):
    """One step of Qwen3Model: bf16 autocast forward, fp32 cross entropy, backward, AdamW.
    variant "compile": each block compiled as the Trainer compiles it;
    "compile_sac": per-op selective activation checkpointing, then compiled."""
    with torch.device("cuda"):
        model = model_cls(args)
    model.init_weights()
    if variant is not None:
        # this fork's own functions, as its Trainer applies them
        from torchtitan.config.job_config import ActivationCheckpoint, Compile
        from torchtitan.distributed.activation_checkpoint import apply_ac
        from torchtitan.models.llama4.infra.parallelize import apply_compile
        from torchtitan.models.qwen3.infra.parallelize import _op_sac_save_list

        if variant == "compile_sac":
            apply_ac(
                model, ActivationCheckpoint(mode="selective", selective_ac_option="op"),
                model_compile_enabled=True, op_sac_save_list=_op_sac_save_list,
            )
        apply_compile(model, Compile(enable=True, components=["model"]), ep_enabled=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens, masks)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def worker(path_name, backend, seq_lens, out, command, step_variants):
    """Runs one backend inside one fork; appends each measurement to `out` as a JSON
    line as soon as it is taken, so that an interrupted run keeps what it measured."""
    # torchtitan is imported here, in the worker, whose PYTHONPATH picks the fork
    import torchtitan.models.qwen3.model.model as qwen3_model
    from torchtitan.models.attention import FlexAttentionWrapper
    from torchtitan.models.qwen3 import qwen3_args

    # one compiled flex per shape: do not fall back to eager after 8 of them
    torch._dynamo.config.recompile_limit = 64
    if backend == "flex":
        # torchtitan's max-autotune options spend about a minute tuning each shape;
        # all three columns run this same compiled kernel instead
        FlexAttentionWrapper._compiled_flex_attn = torch.compile(flex_attention)
    torch.manual_seed(0)
    eos = type("Tokenizer", (), {"eos_id": EOS_ID})()
    device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    sink = out.open("a")

    def run(fn, **row):
        try:
            row |= measure(fn, SLEEP_CYCLES[row["kind"]])
            if row["backend"] == "sdpa":
                row["sdpa_kernels"] = sdpa_kernels(fn)
        except torch.OutOfMemoryError:
            row |= {"ms": None, "times": None, "peak_bytes": None, "call_bytes": None}
        row |= {"path": path_name, "device": device, "command": command}
        sink.write(json.dumps(row) + "\n")
        sink.flush()
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()

    def masks_for(args, tokens):
        if backend == "sdpa":
            return None
        with torch.device("meta"):
            return qwen3_model.Qwen3Model(replace(args, n_layers=1)).get_attention_masks(tokens, eos)

    mask_type = "causal" if backend == "sdpa" else "block_causal"
    if step_variants:
        (n_heads, n_kv_heads), (flavor, n_layers) = next(iter(LAYOUTS.items()))
        args = replace(qwen3_args[flavor], attn_type=backend, attn_mask_type=mask_type,
                       max_seq_len=STEP_SEQ_LEN, n_layers=n_layers)
        tokens = documents(STEP_SEQ_LEN)
        for variant in step_variants:
            torch._dynamo.reset()
            run(training_step(qwen3_model.Qwen3Model, args, tokens, masks_for(args, tokens), variant),
                kind="step", variant=variant, backend=backend, heads=f"{n_heads}/{n_kv_heads}", flavor=flavor,
                n_layers=n_layers, total_layers=qwen3_args[flavor].n_layers, seq_len=STEP_SEQ_LEN)
        sink.close()
        return
    for (n_heads, n_kv_heads), (flavor, n_layers) in LAYOUTS.items():
        heads = f"{n_heads}/{n_kv_heads}"
        for seq_len in seq_lens:
            args = replace(qwen3_args[flavor], attn_type=backend, attn_mask_type=mask_type,
                           max_seq_len=seq_len, qk_norm=False)
            masks = masks_for(args, documents(seq_len))
            row = dict(kind="attention", backend=backend, heads=heads, seq_len=seq_len)
            with mock.patch.object(qwen3_model, "apply_rotary_emb", lambda xq, xk, *_: (xq, xk)):
                run(attention_call(qwen3_model, args, seq_len, masks), variant="layer", **row)
            if path_name == "series":
                run(kernel_floor(backend, args, seq_len, masks), variant="floor", **row)
        args = replace(qwen3_args[flavor], attn_type=backend, attn_mask_type=mask_type,
                       max_seq_len=STEP_SEQ_LEN, n_layers=n_layers)
        tokens = documents(STEP_SEQ_LEN)
        run(training_step(qwen3_model.Qwen3Model, args, tokens, masks_for(args, tokens)), kind="step",
            backend=backend, heads=heads, flavor=flavor, n_layers=n_layers,
            total_layers=qwen3_args[flavor].n_layers, seq_len=STEP_SEQ_LEN)
    sink.close()


def repeated_kv_bytes(heads, seq_len, head_dim=128, n_layers=1):
    """Bytes of K and V beyond n_kv_heads that the 0.2.1 path saves for backward (bf16)."""
    n_heads, n_kv_heads = map(int, heads.split("/"))
    return 2 * seq_len * (n_heads - n_kv_heads) * head_dim * 2 * n_layers


def spread(times):
    """Interquartile range of `times`, relative to their median."""
    q1, median, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / median


def mib(n):
    return "OOM" if n is None else f"{n / 2**20:.0f}"


def gib(n):
    return "OOM" if n is None else f"{n / 2**30:.2f}"


def ms(t):
    return "OOM" if t is None else f"{t:.2f}"


def times(r):
    return "-" if r is None else f"{r:.3f}"


def difference(a, b):
    return None if a is None or b is None else a - b


def ratio(a, b):
    return None if a is None or b is None else a / b


class Results:
    def __init__(self, rows):
        # the kernel and step measurements; Trainer runs have tables of their own
        self.rows = [r for r in rows if r["kind"] in ("attention", "step")]
        self.by_key = {self.key(r): r for r in self.rows}

    @staticmethod
    def key(r):
        return r["kind"], r["backend"], r["heads"], r["seq_len"], r.get("variant"), r["path"]

    def match(self, row, *, path, variant=None):
        """The measurement of `row`'s case on another path or variant, if taken."""
        return self.by_key.get(self.key(row)[:4] + (variant, path))

    def get(self, row, field, *, path, variant=None):
        other = self.match(row, path=path, variant=variant)
        return other and other[field]

    def sdpa_kernels(self, row):
        """'0.2.1's kernels → the series' kernels' for an SDPA row, else ''."""
        if row["backend"] != "sdpa":
            return ""
        old = self.get(row, "sdpa_kernels", path="0.2.1", variant=row.get("variant"))
        return f"{'+'.join(old or ['-'])} → {'+'.join(row.get('sdpa_kernels') or ['-'])}"

    def series(self, kind, variant=None):
        return [r for r in self.rows if r["kind"] == kind and r["path"] == "series" and r.get("variant") == variant]


def attention_table(results):
    lines = [
        "| backend | heads | seq | 0.2.1 ms | series ms | floor ms | series / floor time "
        "| 0.2.1 MiB | series MiB | floor MiB | series / floor memory | saved MiB | expected MiB | SDPA kernels 0.2.1 → series |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.series("attention", "layer"):
        old_ms, old_bytes = (results.get(r, f, path="0.2.1", variant="layer") for f in ("ms", "call_bytes"))
        floor_ms, floor_bytes = (results.get(r, f, path="series", variant="floor") for f in ("ms", "call_bytes"))
        time_ratio, memory_ratio = ratio(r["ms"], floor_ms), ratio(r["call_bytes"], floor_bytes)
        saved = difference(old_bytes, r["call_bytes"])
        lines.append(
            f"| {r['backend']} | {r['heads']} | {r['seq_len']} | {ms(old_ms)} | {ms(r['ms'])} | {ms(floor_ms)} "
            f"| {times(time_ratio)} | {mib(old_bytes)} | {mib(r['call_bytes'])} | {mib(floor_bytes)} "
            f"| {times(memory_ratio)} | {mib(saved)} | {mib(repeated_kv_bytes(r['heads'], r['seq_len']))} "
            f"| {results.sdpa_kernels(r)} |"
        )
    return lines


STEP_COLUMNS = (
    "| 0.2.1 ms | series ms | 0.2.1 tokens/s | series tokens/s "
    "| 0.2.1 peak GiB | series peak GiB | saved MiB | expected MiB | SDPA kernels 0.2.1 → series |"
)


def step_cells(results, r):
    """The 0.2.1-vs-series cells of a training step row `r` of the series."""
    old_ms, old_peak = (results.get(r, f, path="0.2.1", variant=r.get("variant")) for f in ("ms", "peak_bytes"))
    tokens_per_s = lambda t: "OOM" if t is None else f"{r['seq_len'] / t * 1e3:.0f}"  # noqa: E731
    return (
        f"| {ms(old_ms)} | {ms(r['ms'])} | {tokens_per_s(old_ms)} | {tokens_per_s(r['ms'])} "
        f"| {gib(old_peak)} | {gib(r['peak_bytes'])} | {mib(difference(old_peak, r['peak_bytes']))} "
        f"| {mib(repeated_kv_bytes(r['heads'], r['seq_len'], n_layers=r['n_layers']))} | {results.sdpa_kernels(r)} |"
    )


def step_table(results):
    lines = [
        f"| backend | heads | widths of, layers kept {STEP_COLUMNS}",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.series("step"):
        lines.append(
            f"| {r['backend']} | {r['heads']} | {r['flavor']}, {r['n_layers']} of {r['total_layers']} {step_cells(results, r)}"
        )
    return lines


def compiled_table(results):
    lines = [f"| backend | step {STEP_COLUMNS}", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant in STEP_VARIANTS:
        for r in results.series("step", variant):
            lines.append(f"| {r['backend']} | {STEP_NAMES[variant]} {step_cells(results, r)}")
    return lines


STEP_NAMES = {"eager": "eager", "compile": "compiled", "compile_sac": "per-op SAC, compiled"}
# (n_heads, n_kv_heads, head_dim, layers) of the Trainer cases' flavors
TRAINER_FLAVORS = {"0.6B": (16, 8, 128, 28), "0.6B_mqa": (16, 1, 128, 28)}


def cp_kv_bytes(flavor, seq_len, heads, cp=2):
    """K/V bytes one rank sends per step under context parallel, computed: the
    K and V of its sequence chunk to the other ranks in forward, again in
    backward, and their gradients back (bf16)."""
    layers = TRAINER_FLAVORS[flavor][3]
    head_dim = TRAINER_FLAVORS[flavor][2]
    return 3 * layers * (cp - 1) * (seq_len // cp) * heads * head_dim * 2 * 2


def trainer_table(rows):
    lines = [
        "| case | flavor, heads | backend | seq | 0.2.1 tokens/s per GPU | series tokens/s per GPU "
        "| 0.2.1 GiB per GPU | series GiB per GPU | final loss 0.2.1 → series | K/V MiB sent per step per GPU, computed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_case = {}
    for r in rows:
        if r["kind"] == "trainer":
            by_case.setdefault((r["case"], r["flavor"], r["backend"], r["seq_len"]), {})[r["path"]] = r
    for (case, flavor, backend, seq_len), paths in by_case.items():
        n_heads, n_kv_heads = TRAINER_FLAVORS[flavor][:2]
        cells = []
        for field, fmt in (("tps", "{:.0f}"), ("memory_gib", "{:.2f}")):
            cells += [fmt.format(paths[p][field]) if paths.get(p, {}).get(field) is not None
                      else ("failed" if p in paths else "-") for p in ("0.2.1", "series")]
        losses = " → ".join(f"{paths[p]['losses'][-1]:.4f}" if paths.get(p, {}).get("losses") else "-"
                            for p in ("0.2.1", "series"))
        kv = (f"{mib(cp_kv_bytes(flavor, seq_len, n_heads))} → {mib(cp_kv_bytes(flavor, seq_len, n_kv_heads))}"
              if case == "cp" else "")
        lines.append(f"| {case} | {flavor}, {n_heads}/{n_kv_heads} | {backend} | {seq_len} | {' | '.join(cells)} "
                     f"| {losses} | {kv} |")
    failures = [f"- {r['case']} {r['flavor']} {r['backend']} {r['path']}: {r['error']}"
                for r in rows if r["kind"] == "trainer" and r.get("error")]
    return lines + ([""] + failures if failures else [])


def one_gpu_flops(r, step):
    """Model FLOPs of one step of a one-GPU row, forward and backward, without
    recomputation: 6 per parameter outside the embedding per token (as
    torchtitan counts them), and for attention 12 × layers × heads × head_dim
    per (query, key) pair that each document's causal mask lets attend."""
    m, lengths = r["model"], r["document_lengths"][step]
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    dense = 6 * (r["params"] - m["vocab_size"] * m["dim"]) * sum(lengths)
    return dense + 12 * m["n_layers"] * m["n_heads"] * m["head_dim"] * pairs


def one_gpu_stats(r):
    """A one-GPU row's numbers over its steps after the warm-up: tokens/s (median)
    and its spread, peak GiB (over all steps), MFU % from the documents' lengths
    and MFU % as torchtitan logs it (medians); None where it has none."""
    steps = range(r["warmup"], len(r.get("tps") or []))
    if r.get("skipped") or r.get("error") or not steps:
        return None
    tps = [r["tps"][i] for i in steps]
    mfu = [100 * one_gpu_flops(r, i) * r["tps"][i] / sum(r["document_lengths"][i]) / r["peak_flops"] for i in steps]
    return dict(tps=statistics.median(tps), spread=spread(tps), memory=max(r["memory_gib"]),
                mfu=statistics.median(mfu), mfu_logged=statistics.median(r["mfu_logged"][r["warmup"]:]))


def one_gpu_status(r):
    """What a one-GPU row without numbers shows instead."""
    if r.get("skipped"):
        return r["skipped"]
    if r.get("oom"):
        return "OOM"
    return "time limit" if r.get("error") == STOPPED else "failed"


def one_gpu_column_name(column):
    path, kernel = column
    return path if kernel == "builtin" else f"{path} {kernel.upper()}"


def one_gpu_by_case(rows):
    """{(flavor, seq_len): {(path, kernel): row}}, in the order the rows ran."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["flavor"], r["seq_len"]), {})[(r["path"], r["varlen_kernel"])] = r
    return by_case


def one_gpu_table(rows):
    names = [one_gpu_column_name(c) for c in ONE_GPU_COLUMNS]
    series, release = ("series", "builtin"), ("0.2.1", "builtin")
    lines = [
        "| Qwen3 size | seq | documents per step: median, longest "
        + "".join(f"| {quantity} {name} " for quantity in ("tokens/s", "peak GiB", "MFU %") for name in names)
        + "| series / 0.2.1 tokens/s | torchtitan's MFU % (series) |",
        "|---" * (3 + 3 * len(names) + 2) + "|",
    ]
    reasons = {}
    for (flavor, seq_len), columns in one_gpu_by_case(rows).items():
        first = next(iter(columns.values()))
        m, lengths = first["model"], first["document_lengths"][first["warmup"]:]
        params = next((r["params"] for r in columns.values() if r.get("params")), None)
        size = f"{flavor} ({params / 1e9:.2f}B params" if params else f"{flavor} ("
        size += f"{', ' if params else ''}{m['n_layers']} layers, {m['n_heads']}/{m['n_kv_heads']} heads)"
        documents = f"{statistics.median(map(len, lengths)):.0f}, {max(map(max, lengths))} tokens"
        stats = {c: one_gpu_stats(columns[c]) if c in columns else None for c in ONE_GPU_COLUMNS}

        def cell(column, fmt):
            if stats[column] is not None:
                return fmt(stats[column])
            r = columns.get(column)
            if r is None:
                return "-"
            reason = r.get("reason") or r.get("error") or f"logged {len(r['tps'])} steps"
            reasons.setdefault(reason, {})[f"{flavor} {seq_len} {one_gpu_column_name(column)}"] = None
            return one_gpu_status(r)

        cells = [cell(c, lambda s: f"{s['tps']:,.0f} ±{s['spread']:.1%}") for c in ONE_GPU_COLUMNS]
        cells += [cell(c, lambda s: f"{s['memory']:.2f}") for c in ONE_GPU_COLUMNS]
        cells += [cell(c, lambda s: f"{s['mfu']:.1f}") for c in ONE_GPU_COLUMNS]
        speed = stats[series] and stats[release] and stats[series]["tps"] / stats[release]["tps"]
        cells += [f"{speed:.3f}" if speed else "-",
                  f"{stats[series]['mfu_logged']:.1f}" if stats[series] else "-"]
        lines.append(f"| {size} | {seq_len} | {documents} | {' | '.join(cells)} |")
    return lines + ([""] + [f"- {', '.join(where)}: {reason}" for reason, where in reasons.items()] if reasons else [])


def one_gpu_intro(rows):
    """The one-GPU section's method, from its rows."""
    first = rows[0]
    m = first["model"]
    common = " ".join(ONE_GPU_OVERRIDES)
    return [
        *[f"- {device}, measured by `{command}`"
          for device, command in dict.fromkeys((r["device"], r["command"]) for r in rows)],
        f"- raw results: [{ONE_GPU_RAW}]({ONE_GPU_RAW}); plot: [{ONE_GPU_PLOT}]({ONE_GPU_PLOT})",
        f"- each run: `torchrun --nproc_per_node 1 -m torchtitan.train --job.config_file "
        f"configs/{ONE_GPU_CONFIG.name} {common}` with the case's `--model.flavor=<size>_varlen_attn`, "
        f"`--training.seq_len` and `--training.steps={first['warmup'] + ONE_GPU_MEASURED}` "
        "(and `--model.varlen_kernel=fa4` in the FA4 column), "
        + ", ".join(f"`{k}={v}`" for k, v in ONE_GPU_ENV.items())
        + "; one run at a time, case by case (the 0.2.1 path, then the series), the FA4 runs last. Batch 1, "
        "bf16 autocast with fp32 weights, gradients and AdamW moments (one GPU: no FSDP)",
        f"- model: Qwen3's sizes with untied output (`tests/integration/gqa_flavors.py`, so that both paths "
        f"train the same model) and Qwen3's {m['vocab_size']:,}-entry vocabulary: embedding, output layer "
        f"and loss are full size. The bundled tokenizer (`data/tokenizer`) has {first['tokenizer_vocab']} "
        "tokens, so only its ids occur",
        "- data: `c4_test` over `data/multi_doc`, packed by torchtitan's loader; the documents of each step "
        "are those of the Trainer's own loader and varlen masks for the same arguments (`--trainer-inputs`)",
        f"- tokens/s: the median of the Trainer's logged tps over steps {first['warmup'] + 1}-"
        f"{first['warmup'] + ONE_GPU_MEASURED} (steps 1-{first['warmup']} warm up: step 1 compiles, step 2 "
        "compiles again with dynamic shapes, as the documents' count and longest length change), ± the "
        "interquartile range over the median; peak GiB: the largest memory the Trainer logs (reserved by "
        f"the allocator), over all steps, of the GPU's {first['gpu_gib']:.1f} GiB",
        "- MFU: each step's model FLOPs over its time (tokens / tps) and the GPU's peak bf16 rate as "
        f"torchtitan takes it ({first['peak_flops'] / 1e12:.0f} TFLOP/s), the median over the measured steps. "
        "Model FLOPs: 6 per parameter outside the embedding per token, as torchtitan counts them, plus "
        "12 × layers × heads × head_dim per (query, key) pair that each document's causal mask lets attend, "
        "from the documents' real lengths; SAC's recomputation is not counted. torchtitan's own MFU (last "
        "column) counts 12 × layers × heads × head_dim × seq_len per token, full attention over the whole "
        "sequence, which packed documents never compute: it overstates",
        "- left out: 8B, whose fp32 weights, gradients and AdamW moments alone take 16 B × 8.19e9 "
        "parameters = 122 GiB, more than an H100's 80 GB (an H200's 141 GB would leave under 20 GiB for "
        "activations, logits and workspace; not tried), and 4B at 32k (65.7 GiB of weights, gradients and "
        "moments, with four times the activations of 4B at 8k: too close to an H100's memory to spend one "
        "of the 10-minute GPU calls on)",
    ]


def plot_one_gpu(rows, path):
    """Peak memory and tokens/s by model size: a bar per sequence length and column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["flavor"] for r in rows))
    by_key = {(r["flavor"], r["seq_len"], r["path"], r["varlen_kernel"]): r for r in rows}
    # a bar for each (seq_len, path, kernel) that ran at least once, the columns side by side per length
    ran = {(r["seq_len"], r["path"], r["varlen_kernel"]) for r in rows if not r.get("skipped")}
    bars = sorted(ran, key=lambda bar: (bar[0], ONE_GPU_COLUMNS.index(bar[1:])))
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    width = 0.8 / max(1, len(bars))
    for i, (seq_len, path_name, kernel) in enumerate(bars):
        label = f"{one_gpu_column_name((path_name, kernel))}, {seq_len // 1024}k tokens"
        for ax, field in zip(axes, ("memory", "tps")):
            xs, values = [], []
            for x, size in enumerate(sizes):
                r = by_key.get((size, seq_len, path_name, kernel))
                stats = r and one_gpu_stats(r)
                position = x + (i - (len(bars) - 1) / 2) * width
                if stats:
                    xs.append(position)
                    values.append(stats[field])
                elif r and not r.get("skipped"):
                    ax.text(position, 0, f" {one_gpu_status(r)}", rotation=90, ha="center", va="bottom", fontsize=8)
            ax.bar(xs, values, width, label=label)
    gpu_gib = rows[0]["gpu_gib"]
    axes[0].axhline(gpu_gib, color="gray", linestyle="--", label=f"GPU memory ({gpu_gib:.0f} GiB)")
    axes[0].set_title("peak memory (GiB reserved, as the Trainer logs it)")
    axes[1].set_title("tokens/s (median after warm-up)")
    for ax in axes:
        ax.set_xticks(range(len(sizes)), [f"Qwen3 {size}" for size in sizes])
        ax.set_xlim(-0.5, len(sizes) - 0.5)
        ax.legend(fontsize=8)
    fig.suptitle(f"torchtitan's Trainer, one GPU: {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def targets(results):
    """Each target of the benchmark, met or not, with the worst case behind the verdict."""
    lines = []

    def verdict(name, values, fails, describe, worst, label="worst"):
        """values: {case: number or None (OOM)}; fails(number) -> bool."""
        if not values:
            lines.append(f"- not measured: {name}")
            return
        failures = [f"{case}: {describe(v)}" for case, v in values.items() if v is None or fails(v)]
        measured = [v for v in values.values() if v is not None]
        summary = f"{label}: {describe(worst(measured))}" if measured else "all OOM"
        lines.append(f"- {'NOT met' if failures else 'met'}: {name} ({summary})")
        lines.extend(f"  - {f}" for f in failures)

    def case(r):
        return f"{r['backend']} {r['heads']}" + (f" seq {r['seq_len']}" if r["kind"] == "attention" else "")

    layers = results.series("attention", "layer")
    steps = results.series("step")
    varlen = [r for r in layers if r["backend"] == "varlen"]
    verdict(
        "varlen attention call within 2% of the kernel floor in time",
        {case(r): ratio(r["ms"], results.get(r, "ms", path="series", variant="floor")) for r in varlen},
        lambda v: v > 1.02, lambda v: f"{v:.3f}× the floor" if v else "OOM", max,
    )
    verdict(
        "varlen attention call memory within 1% of the kernel floor",
        {case(r): ratio(r["call_bytes"], results.get(r, "call_bytes", path="series", variant="floor")) for r in varlen},
        lambda v: abs(v - 1) > 0.01, lambda v: f"{v:.3f}× the floor" if v else "OOM",
        lambda vs: max(vs, key=lambda v: abs(v - 1)),
    )
    saved = {}
    for r in steps:
        old = results.get(r, "peak_bytes", path="0.2.1")
        expected = repeated_kv_bytes(r["heads"], r["seq_len"], n_layers=r["n_layers"])
        saved[case(r)] = ratio(difference(old, r["peak_bytes"]), expected)
    verdict(
        "eager training step peak memory lower than 0.2.1 by at least the repeated K/V bytes",
        saved, lambda v: v < 1, lambda v: f"saved {v:.2f}× the expected" if v is not None else "OOM", min,
    )
    # below 0.2.1 by more than the run-to-run spread (the wider interquartile
    # range of the two, relative to its median)
    speed = {}
    for r in steps:
        old = results.match(r, path="0.2.1")
        if old and old["ms"] is not None and r["ms"] is not None:
            speed[case(r)] = (old["ms"] / r["ms"], max(spread(old["times"]), spread(r["times"])))
        else:
            speed[case(r)] = None
    verdict(
        "eager training step tokens/s not below 0.2.1 on any backend, beyond the run-to-run spread",
        speed, lambda v: v[0] < 1 - v[1],
        lambda v: f"{v[0]:.3f}× 0.2.1's tokens/s, spread ±{v[1]:.1%}" if v else "OOM", min,
    )
    verdict(
        "sdpa and flex attention call memory not above 0.2.1 for any layout",
        {case(r): ratio(r["call_bytes"], results.get(r, "call_bytes", path="0.2.1", variant="layer"))
         for r in layers if r["backend"] != "varlen"},
        lambda v: v > 1, lambda v: f"{v:.3f}× 0.2.1" if v else "OOM", max,
    )
    compiled = [r for variant in STEP_VARIANTS for r in results.series("step", variant)]
    sdpa = [r for r in layers + steps + compiled if r["backend"] == "sdpa"]
    verdict(
        "SDPA never on the math kernel",
        {f"{r['kind']} {r.get('variant') or ''} {case(r)}": r.get("sdpa_kernels") for r in sdpa if r["ms"] is not None},
        lambda kernels: not kernels or "math" in kernels, lambda kernels: "+".join(kernels) or "no SDPA op seen",
        lambda all_kernels: sorted({k for kernels in all_kernels for k in kernels}),
        label="kernels seen",
    )
    return lines


def report(rows, out_dir):
    results = Results(rows)
    one_gpu = [r for r in rows if r["kind"] == "trainer_1gpu"]
    runs = {}
    for r in rows:
        runs.setdefault((r["device"], r["command"]), set()).add(r["backend"])
    raw = ", ".join(f"[{name}]({name})" for name in RAW_FILES if (out_dir / name).exists())
    lines = [
        "# GQA benchmark: the 0.2.1 path vs the series vs the kernel floor",
        "",
        *[f"- {', '.join(b for b in BACKENDS if b in backends)}: {device}, measured by `{command}`"
          for (device, command), backends in runs.items()],
        f"- raw results: {raw}; plot: [benchmark.png](benchmark.png)",
        "- 0.2.1 path: the release with only the torch-compatibility patch (`materialize --upto 0001`); "
        "series: all patches",
        "- time: GPU time, the median of 10 calls after 3 warm-up calls, by CUDA events; each timed call "
        "is queued behind a GPU sleep so that the CPU has launched it before the start event, as in "
        "training, where the CPU runs ahead; memory: `torch.cuda.max_memory_allocated` around one more call",
        "- flex: compiled with `torch.compile` defaults in all three columns (torchtitan's max-autotune "
        "options spend about a minute tuning each shape)",
        "",
        "## Targets",
        "",
        *targets(results),
        "",
        f"## Attention call, forward + backward, bf16, {DOCUMENTS} packed documents per sequence",
        "",
        "Each fork's own Qwen3 `Attention.forward` from q/k/v to the output (projections return prepared "
        "tensors; RoPE, q/k norm and wo off), against the floor: the bare kernel (`varlen_attn`; SDPA with "
        "`enable_gqa` in the wrapper's backend order; compiled `flex_attention` with `enable_gqa`) on "
        "pre-packed tensors with n_kv_heads. MiB: peak above what was allocated before the call. "
        "Expected: the repeated K/V bytes the 0.2.1 path saves for backward. "
        "sdpa is causal over the whole row (0.2.1's sdpa has no document mask); flex and varlen are block-causal.",
        "",
        *attention_table(results),
        "",
        f"## Training step (Qwen3Model, seq {STEP_SEQ_LEN}, batch 1, bf16 autocast, fp32 AdamW)",
        "",
        "Widths and head counts of the named Qwen3 size, with as many of its layers as fit one 80 GB GPU "
        "with a few GiB to spare (the logits over Qwen3's 151,936-token vocabulary alone take about 15 GiB). "
        "Peak: `max_memory_allocated` over a whole step, optimizer state included. "
        "Expected: repeated K/V bytes × layers kept.",
        "",
        *step_table(results),
        *([
            "",
            f"## Training step as the Trainer runs it: compiled, and with per-op SAC (Qwen3Model 0.6B, seq {STEP_SEQ_LEN})",
            "",
            "The same step on one GPU, with each block compiled by the fork's own `apply_compile` "
            "(fullgraph), and with per-op selective activation checkpointing applied by its `apply_ac` "
            "before compiling, as the Trainer does; the eager row is from the same run.",
            "",
            *compiled_table(results),
        ] if any(r.get("variant") in STEP_VARIANTS for r in rows) else []),
        *([
            "",
            "## One GPU: torchtitan's Trainer at real sizes (Qwen3, compiled, per-op SAC, varlen on packed documents)",
            "",
            *one_gpu_intro(one_gpu),
            "",
            *one_gpu_table(one_gpu),
            "",
            f"![peak memory and tokens/s by size]({ONE_GPU_PLOT})",
        ] if one_gpu else []),
        *([
            "",
            "## Two GPUs: torchtitan's Trainer (Qwen3 0.6B, all 28 layers, batch 1 per GPU)",
            "",
            f"Each case once for each path, {TRAINER_STEPS} steps, one run per GPU pair at a time. tokens/s: "
            "the median over the steps after the first two, per GPU; memory: the peak the Trainer logs "
            "(reserved, rank 0). TP trains in float32 (torchtitan applies mixed precision through FSDP or "
            "autocast only); the others in bf16. KV heads replicated: 0.6B with 1 KV head, so TP=2 "
            "replicates it. CP: ring attention rotates K/V with their heads; the last column is computed "
            "(see `cp_kv_bytes`), repeated (0.2.1) → n_kv_heads (series).",
            "",
            *trainer_table(rows),
        ] if any(r["kind"] == "trainer" for r in rows) else []),
    ]
    (out_dir / "benchmark.md").write_text("\n".join(lines) + "\n")
    plot(results.rows, out_dir / "benchmark.png")
    if one_gpu:
        plot_one_gpu(one_gpu, out_dir / ONE_GPU_PLOT)
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = "32/8"
    styles = {("0.2.1", "layer"): "o--", ("series", "layer"): "s-", ("series", "floor"): "^:"}
    fig, axes = plt.subplots(2, len(BACKENDS), figsize=(15, 8), squeeze=False)
    for col, backend in enumerate(BACKENDS):
        for (path_name, variant), style in styles.items():
            points = sorted(
                (r["seq_len"], r["call_bytes"] / 2**20, r["ms"]) for r in rows
                if (r["kind"], r["backend"], r["heads"], r["path"], r.get("variant")) == ("attention", backend, heads, path_name, variant)
                and r["ms"] is not None
            )
            if points:
                seq_lens, memory, times = zip(*points)
                label = "kernel floor" if variant == "floor" else path_name
                axes[0, col].plot(seq_lens, memory, style, label=label)
                axes[1, col].plot(seq_lens, times, style, label=label)
        axes[0, col].set_title(f"{backend}, {heads} heads: peak memory of the call (MiB)")
        axes[1, col].set_title(f"{backend}, {heads} heads: fwd+bwd time (ms)")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length (tokens)")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


PARTS = ("kernels", "compiled", "trainer")
STEP_VARIANTS = ("eager", "compile", "compile_sac")
RAW_FILES = [f"benchmark-{backend}.jsonl" for backend in BACKENDS] + [
    "benchmark-compiled.jsonl", "benchmark-trainer.jsonl", "benchmark-trainer-1gpu.jsonl"
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                        help="measure these again; the report also takes the other backends' "
                        "earlier results from --out")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="kernels: attention calls and eager steps, on one GPU; compiled: the "
                        "step compiled and with SAC, one GPU per worker; trainer: torchtitan's Trainer, on "
                        "one GPU at real sizes, then on GPU pairs (skipped on one GPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing; remake the report from the raw results in --out")
    parser.add_argument("--time-limit", type=float, metavar="SECONDS",
                        help="one-GPU Trainer runs: start none that would end later than this after the "
                        "benchmark started, and stop one still running then")
    parser.add_argument("--worker", nargs=2, metavar=("PATH", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--step-variants", nargs="+", choices=STEP_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--command", help=argparse.SUPPRESS)
    parser.add_argument("--trainer-inputs", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.started = time.monotonic()
    if args.trainer_inputs:
        return trainer_inputs()
    if args.worker:
        return worker(*args.worker, args.seq_lens, args.out, args.command, args.step_variants)

    if not args.report_only:
        if not torch.cuda.is_available():
            sys.exit("error: the benchmark needs a CUDA GPU; run it on a GPU machine")
        for path in PATHS.values():
            if not (path / "torchtitan").is_dir():
                sys.exit(f"error: {path} is missing; materialize it first (see the top of {Path(__file__).name})")
        args.out.mkdir(parents=True, exist_ok=True)
        args.command = "python3 scripts/benchmark.py " + " ".join(sys.argv[1:])
        for part, measure_part in (("kernels", measure_backends), ("compiled", measure_compiled), ("trainer", measure_trainer)):
            if part in args.parts:
                measure_part(args)
    raws = [args.out / name for name in RAW_FILES]
    rows = [json.loads(line) for raw in raws if raw.exists() for line in raw.read_text().splitlines()]
    if not rows:
        sys.exit(f"error: no results in {args.out}; run the benchmark without --report-only first")
    print(report(rows, args.out))
    one_gpu = [r for r in rows if r["kind"] == "trainer_1gpu"]
    if one_gpu and not args.report_only:
        # last, so that a short tail of the output holds it
        print("\nOne GPU, torchtitan's Trainer:\n" + "\n".join(one_gpu_table(one_gpu)))


def worker_env(path):
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")])),
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",  # the largest steps run near 80 GB
    }


def measure_backends(args):
    for backend in args.backends:
        raw = args.out / f"benchmark-{backend}.jsonl"
        raw.unlink(missing_ok=True)
        for name, path in PATHS.items():
            subprocess.run(
                [BASE.python, __file__, "--worker", name, backend, "--out", str(raw),
                 "--seq-lens", *map(str, args.seq_lens), "--command", args.command],
                env=worker_env(path), check=True,
            )


def measure_compiled(args):
    """The 0.6B step of every backend and path, eager, compiled and compiled
    with per-op SAC; each (backend, path) in its own worker on its own GPU."""
    raw = args.out / "benchmark-compiled.jsonl"
    parts = {job: args.out / f".compiled-{job[0]}-{job[1]}.jsonl" for job in itertools.product(PATHS, BACKENDS)}

    def run(job, gpus):
        name, backend = job
        parts[job].unlink(missing_ok=True)
        subprocess.run(
            [BASE.python, __file__, "--worker", name, backend, "--out", str(parts[job]),
             "--step-variants", *STEP_VARIANTS, "--command", args.command],
            env={**worker_env(PATHS[name]), "CUDA_VISIBLE_DEVICES": gpus}, check=True,
        )

    runs.on_gpu_sets(list(parts), run, lambda job: 1, torch.cuda.device_count())
    raw.write_text("".join(part.read_text() for part in parts.values()))
    for part in parts.values():
        part.unlink()


# (case, Trainer overrides, Qwen3 flavor of tests/integration/gqa_flavors.py,
# backend, path, seq_len), all on two GPUs. The 0.2.1 path's flex fails under
# TP, and varlen is refused there (it computes in bf16, TP alone in float32).
FSDP = ("--parallelism.data_parallel_shard_degree=2",)
TP = ("--parallelism.tensor_parallel_degree=2",)
CP = ("--parallelism.context_parallel_degree=2",)
TRAINER_CASES = (
    [("fsdp", FSDP, "0.6B", backend, path, 8192) for backend in BACKENDS for path in PATHS]
    + [("tp", TP, "0.6B", backend, path, 8192)
       for backend in ("sdpa", "flex") for path in PATHS if path == "series" or backend == "sdpa"]
    + [("tp, KV heads replicated", TP, "0.6B_mqa", backend, path, 8192)
       for backend in ("sdpa", "flex") for path in PATHS if path == "series" or backend == "sdpa"]
    + [("cp", CP, "0.6B", "sdpa", path, seq_len) for seq_len in (8192, 16384, 32768) for path in PATHS]
)
TRAINER_STEPS = 10
TRAINER_SUFFIX = {"sdpa": "", "flex": "_flex_attn", "varlen": "_varlen_attn"}


def measure_trainer(args):
    measure_trainer_one_gpu(args)
    measure_trainer_pairs(args)


def measure_trainer_pairs(args):
    """torchtitan's Trainer on GPU pairs, one run per pair at a time: tokens/s
    per GPU (median of the steps after the first two) and peak reserved memory
    per GPU, as the Trainer logs them for rank 0. Skipped on fewer than two
    GPUs, keeping the earlier results."""
    raw = args.out / "benchmark-trainer.jsonl"
    if torch.cuda.device_count() < 2:
        kept = f"{raw} keeps its earlier results" if raw.exists() else f"{raw} is not written"
        print(f"skipped the {len(TRAINER_CASES)} two-GPU Trainer cases: this machine has "
              f"{torch.cuda.device_count()} GPU; {kept}", flush=True)
        return
    device = f"{torch.cuda.get_device_name()} x2, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"

    def run(case, gpus):
        name, overrides, flavor, backend, path, seq_len = case
        row = dict(kind="trainer", case=name, flavor=flavor, backend=backend, path=path, seq_len=seq_len,
                   device=device, command=args.command)
        with tempfile.TemporaryDirectory() as dump:
            try:
                log = runs.run_trainer(
                    BASE, PATHS[path], ROOT / "configs" / "qwen3_debugmodel_sdpa.toml", Path(dump),
                    [*overrides, "--model.name=qwen3_gqa", f"--model.flavor={flavor}{TRAINER_SUFFIX[backend]}",
                     "--experimental.custom_import=gqa_flavors", f"--training.seq_len={seq_len}",
                     "--training.local_batch_size=1", f"--training.steps={TRAINER_STEPS}",
                     "--debug.no_deterministic"],
                    nproc=2, gpus=gpus,
                )
                row |= dict(tps=statistics.median(runs.trainer_metric(log, "tps")[2:]),
                            memory_gib=max(runs.trainer_metric(log, "memory")),
                            losses=runs.trainer_metric(log, "loss"))
            except ForkError:
                row |= dict(tps=None, memory_gib=None, losses=None,
                            error=(Path(dump) / "train.log").read_text().strip().splitlines()[-1][-300:])
        print(json.dumps(row), flush=True)
        return row

    rows = list(runs.on_gpu_sets(TRAINER_CASES, run, lambda case: 2, torch.cuda.device_count()).values())
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---- torchtitan's Trainer on one GPU at real sizes

# (Qwen3 flavor of tests/integration/gqa_flavors.py, seq_len), most important
# first: a run cut short by --time-limit leaves the rows before it. 8B and 4B
# at 32k are left out (the report says why).
ONE_GPU_CASES = (("1.7B", 8192), ("4B", 8192), ("1.7B", 32768))
# (path, varlen kernel) of each column: the 0.2.1 path, the series, the series on FA4
ONE_GPU_COLUMNS = (("0.2.1", "builtin"), ("series", "builtin"), ("series", "fa4"))
# warm-up: step 1 compiles, step 2 compiles again with dynamic shapes (the
# count and longest length of the documents change from batch to batch)
ONE_GPU_WARMUP, ONE_GPU_MEASURED = 3, 10
ONE_GPU_CONFIG = ROOT / "configs" / "qwen3_0.6b_varlen.toml"
ONE_GPU_OVERRIDES = (
    "--model.name=qwen3_gqa", "--experimental.custom_import=gqa_flavors",
    "--training.local_batch_size=1", "--metrics.log_freq=1",
    "--compile.enable", "--compile.components=model,loss",
    "--activation_checkpoint.mode=selective", "--activation_checkpoint.selective_ac_option=op",
)
# the allocator setting of torchtitan's run_train.sh
ONE_GPU_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
ONE_GPU_RAW, ONE_GPU_PLOT = "benchmark-trainer-1gpu.jsonl", "benchmark-trainer-1gpu.png"


def one_gpu_overrides(flavor, seq_len, kernel):
    """The Trainer's arguments for one run, on top of ONE_GPU_CONFIG."""
    kernel_args = [] if kernel == "builtin" else [f"--model.varlen_kernel={kernel}"]
    return [*ONE_GPU_OVERRIDES, f"--model.flavor={flavor}_varlen_attn", f"--training.seq_len={seq_len}",
            f"--training.steps={ONE_GPU_WARMUP + ONE_GPU_MEASURED}", *kernel_args]


def one_gpu_runs():
    """(case, column) in the order they run: the 0.2.1 path and the series case
    by case, then the series on FA4 case by case."""
    return [(case, column) for case in ONE_GPU_CASES for column in ONE_GPU_COLUMNS[:2]] + [
        (case, ONE_GPU_COLUMNS[2]) for case in ONE_GPU_CASES
    ]


def trainer_inputs():
    """Prints as JSON what the one-GPU rows take from the series fork (first on
    PYTHONPATH) and this machine: the GPU, its memory, its peak bf16 FLOP/s as
    torchtitan's MFU takes it, why FA4 cannot run here (None where it can), the
    tokenizer's vocabulary, and for each case the model's sizes and the lengths
    of the documents in each step's batch, from the Trainer's own tokenizer,
    data loader and varlen masks, given the runs' arguments."""
    import gqa_flavors  # noqa: F401  (registers qwen3_gqa, as --experimental.custom_import does)
    from torchtitan.config import ConfigManager
    from torchtitan.models.fa4_varlen import fa4_unavailable_reason
    from torchtitan.protocols.train_spec import get_train_spec
    from torchtitan.tools.utils import get_peak_flops

    spec = get_train_spec("qwen3_gqa")
    cases = []
    for flavor, seq_len in ONE_GPU_CASES:
        config = ConfigManager().parse_args(
            ["--job.config_file", str(ONE_GPU_CONFIG), *one_gpu_overrides(flavor, seq_len, "builtin")]
        )
        tokenizer = spec.build_tokenizer_fn(config)
        loader = spec.build_dataloader_fn(dp_world_size=1, dp_rank=0, tokenizer=tokenizer, job_config=config)
        model_args = spec.model_args[config.model.flavor]
        with torch.device("meta"):
            model = spec.model_cls(model_args)
        lengths = []
        for inputs, _ in itertools.islice(loader, config.training.steps):
            masks = model.get_attention_masks(input_batch=inputs["input"], tokenizer=tokenizer)
            lengths.append(masks.cu_seq_q.diff().tolist())
        sizes = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size")
        cases.append(dict(flavor=flavor, seq_len=seq_len, model={k: getattr(model_args, k) for k in sizes},
                          document_lengths=lengths))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print(json.dumps(dict(
        device=gpu,
        gpu_gib=gpu and torch.cuda.get_device_properties(0).total_memory / 2**30,
        peak_flops=gpu and get_peak_flops(gpu),
        fa4_missing=fa4_unavailable_reason(),
        tokenizer_vocab=tokenizer.get_vocab_size(),
        cases=cases,
    )))


def read_trainer_inputs():
    """trainer_inputs(), run in a process of its own with the series fork."""
    proc = subprocess.run(
        [str(BASE.python), __file__, "--trainer-inputs"], cwd=ROOT, capture_output=True, text=True,
        env=runs.fork_env(PATHS["series"], ROOT / "tests" / "integration"),
    )
    if proc.returncode != 0:
        sys.exit(f"error: reading the Trainer's inputs from {PATHS['series']} failed: "
                 f"{last_line(proc.stderr)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stop_child_processes():
    """SIGTERM to this process's children: a Trainer run's torchrun, which stops its workers."""
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # the fields after the command name: state, parent pid, ...
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                os.kill(int(stat.parent.name), signal.SIGTERM)
        except (OSError, IndexError):
            continue


def trainer_failure(log):
    """The line of a failed run's log that says why it failed."""
    lines = log.strip().splitlines() or ["(empty log)"]
    errors = [line for line in lines if re.search(r"\w(Error|Exception)\b", line) and "ChildFailedError" not in line]
    return (errors or lines)[-1].strip()[-300:]


STOPPED = "stopped at --time-limit"


def run_one_gpu(path, overrides, deadline):
    """One Trainer run on GPU 0: its duration and what it logged per step."""
    with tempfile.TemporaryDirectory() as dump:
        start = time.monotonic()
        try:
            log = runs.run_trainer(BASE, PATHS[path], ONE_GPU_CONFIG, Path(dump), overrides, gpus="0")
            error = None
        except ForkError:
            log = re.sub(r"\x1b\[[0-9;]*m", "", (Path(dump) / "train.log").read_text())
            error = STOPPED if time.monotonic() >= deadline else trainer_failure(log)
            print("".join(f"    | {line}\n" for line in log.strip().splitlines()[-20:]), end="", flush=True)
        seconds = time.monotonic() - start
    params = re.search(r"size: ([\d,]+) total parameters", log)
    metrics = {"tps": "tps", "memory_gib": "memory", "loss": "loss", "tflops_logged": "tflops", "mfu_logged": "mfu"}
    return dict(
        seconds=round(seconds, 1), error=error,
        oom=error is not None and ("OutOfMemoryError" in log or "CUDA out of memory" in log),
        params=params and int(params[1].replace(",", "")),
        **{field: runs.trainer_metric(log, name) for field, name in metrics.items()},
    )


def measure_trainer_one_gpu(args):
    """torchtitan's Trainer at real sizes on GPU 0, one run at a time in the
    order of one_gpu_runs(); each row is appended to the raw results as soon as
    its run ends. With --time-limit, a run that would end past it (judged by
    the longest run so far of its case, else of any case) does not start, and
    one still running then is stopped. FA4 runs where flash-attn-4 can run, and
    not where the series ran out of memory with the built-in kernel."""
    raw = args.out / ONE_GPU_RAW
    inputs = read_trainer_inputs()
    device = f"{inputs['device']}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    deadline = args.started + args.time_limit if args.time_limit else float("inf")
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), stop_child_processes) if args.time_limit else None
    if watchdog:
        watchdog.daemon = True
        watchdog.start()
    raw.write_text("")
    durations, done = {}, {}
    try:
        with mock.patch.dict(os.environ, ONE_GPU_ENV):
            for case, column in one_gpu_runs():
                (flavor, seq_len), (path, kernel) = case, column
                measured = next(c for c in inputs["cases"] if (c["flavor"], c["seq_len"]) == case)
                row = dict(
                    kind="trainer_1gpu", backend="varlen", flavor=flavor, seq_len=seq_len, path=path,
                    varlen_kernel=kernel, device=device, command=args.command, gpu_gib=inputs["gpu_gib"],
                    peak_flops=inputs["peak_flops"], tokenizer_vocab=inputs["tokenizer_vocab"],
                    model=measured["model"], overrides=one_gpu_overrides(flavor, seq_len, kernel),
                    warmup=ONE_GPU_WARMUP, document_lengths=measured["document_lengths"],
                )
                estimate = max(durations.get(case) or [d for ds in durations.values() for d in ds] or [0])
                series = done.get((case, ("series", "builtin")))
                if kernel == "fa4" and inputs["fa4_missing"]:
                    missing = "not installed" if "not installed" in inputs["fa4_missing"] else "not available"
                    row |= dict(skipped=missing, reason=inputs["fa4_missing"])
                elif kernel == "fa4" and series and series.get("oom"):
                    row |= dict(skipped="not run", reason="the series ran out of memory here with the built-in kernel")
                elif time.monotonic() + estimate > deadline:
                    row |= dict(skipped="time limit", reason=f"a run takes about {estimate:.0f} s; "
                                f"{max(0, deadline - time.monotonic()):.0f} s of --time-limit were left")
                else:
                    row |= run_one_gpu(path, row["overrides"], deadline)
                    durations.setdefault(case, []).append(row["seconds"])
                done[(case, column)] = row
                with raw.open("a") as sink:
                    sink.write(json.dumps(row) + "\n")
                print(f"[{time.monotonic() - args.started:4.0f} s] {flavor} {seq_len} {path} {kernel}: "
                      f"{one_gpu_summary(row)}", flush=True)
    finally:
        if watchdog:
            watchdog.cancel()


def one_gpu_summary(row):
    if row.get("skipped"):
        return f"not run ({row['reason']})"
    if row["error"]:
        return f"{'OOM' if row['oom'] else 'failed'} after {row['seconds']:.0f} s: {row['error']}"
    stats = one_gpu_stats(row)
    if stats is None:
        return f"logged {len(row['tps'])} steps, none after the {row['warmup']} warm-up steps"
    return f"{stats['tps']:,.0f} tokens/s, {stats['memory']:.2f} GiB, MFU {stats['mfu']:.1f}%, {row['seconds']:.0f} s"


if __name__ == "__main__":
    main()
