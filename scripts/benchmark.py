"""Memory and speed of GQA attention: the 0.2.1 path vs the series vs the kernel floor.

One run measures both forks, each in a worker process with that fork first on
PYTHONPATH (both are packages named torchtitan), and writes docs/benchmark.md,
the raw results and a plot:

    python3 scripts/gqa_fork.py materialize --upto 0001 --dest build/torchtitan-0.2.1-compat
    python3 scripts/benchmark.py [--seq-lens 4096 8192 16384 32768] [--out docs]

Attention layer: Qwen3's Attention module (projections, q/k norm, RoPE, the
backend arm), bf16, forward + backward, 4 packed documents per sequence.
Floor: the series' layer with the attention call replaced by the bare kernel.
Training step: Qwen3Model with real widths and head counts, fewer layers.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATHS = {"0.2.1": ROOT / "build" / "torchtitan-0.2.1-compat", "series": ROOT / "torchtitan"}
# (query heads, KV heads) -> Qwen3 flavor with those heads, and layers that fit one 80 GB GPU
LAYOUTS = {(16, 8): ("0.6B", 28), (32, 8): ("4B", 8), (64, 8): ("32B", 3)}
BACKENDS = ("sdpa", "flex", "varlen")
DOCUMENTS = 4
STEP_SEQ_LEN = 8192


def measure(fn, repeats=10, warmup=3):
    """Median milliseconds over `repeats` and peak bytes above the start of one call."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def tokens_with_documents(seq_len, eos_id, device):
    import torch

    tokens = torch.randint(1, 1000, (1, seq_len), device=device)
    tokens[0, torch.arange(1, DOCUMENTS + 1) * seq_len // DOCUMENTS - 1] = eos_id
    return tokens


class Floor:
    """The bare kernel in place of the series' wrapper, called as the series' arms call it."""

    def __init__(self, backend):
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import sdpa_kernel, SDPBackend
        from torch.nn.attention.flex_attention import flex_attention
        from torch.nn.attention.varlen import varlen_attn

        self.backend = backend
        self.flex = torch.compile(flex_attention)
        self.sdpa = lambda q, k, v, scale: F.scaled_dot_product_attention(
            q, k, v, scale=scale, is_causal=True, enable_gqa=True
        )
        self.sdpa_kernel = lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True)
        self.varlen = varlen_attn

    def __call__(self, q, k, v, masks=None, *, block_mask=None, scale=None):
        import inspect

        match self.backend:
            case "sdpa":
                with self.sdpa_kernel():
                    return self.sdpa(q, k, v, scale)
            case "flex":
                return self.flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
            case "varlen":
                gqa = {"enable_gqa": True} if "enable_gqa" in inspect.signature(self.varlen).parameters else {}
                bs, seqlen = q.shape[:2]
                out = self.varlen(
                    q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), masks.cu_seq_q, masks.cu_seq_k,
                    masks.max_q, masks.max_k, scale=scale, window_size=(-1, 0), **gqa,
                )
                return out.unflatten(0, (bs, seqlen))


def worker(path_name, seq_lens, out):
    """Runs inside one fork; writes its measurements as JSON lines."""
    import torch
    from torchtitan.models.qwen3 import Qwen3Model, qwen3_args
    from torchtitan.models.qwen3.model.model import Attention, precompute_rope_cache

    torch.manual_seed(0)
    eos = type("Tokenizer", (), {"eos_id": 0})()
    results = []

    def record(**row):
        row.update(path=path_name)
        results.append(row)
        print(json.dumps(row), flush=True)

    for (n_heads, n_kv_heads), (flavor, n_layers) in LAYOUTS.items():
        base = qwen3_args[flavor]
        for backend in BACKENDS:
            args = _args(base, backend)
            variants = ["layer", "floor"] if path_name == "series" else ["layer"]
            for seq_len in seq_lens:
                args.max_seq_len = seq_len
                model = Qwen3Model(_replace(args, n_layers=1)).cuda()  # for get_attention_masks
                tokens = tokens_with_documents(seq_len, eos.eos_id, "cuda")
                masks = None if backend == "sdpa" else model.get_attention_masks(tokens, eos)
                rope = precompute_rope_cache(args.head_dim, seq_len, args.rope_theta).cuda()
                x = torch.randn(1, seq_len, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for variant in variants:
                    attention = Attention(args).cuda().to(torch.bfloat16)
                    if variant == "floor":
                        attention.inner_attention = Floor(backend)
                    step = lambda: attention(x, rope, masks).sum().backward()  # noqa: E731
                    try:
                        ms, peak = measure(step)
                    except torch.OutOfMemoryError:
                        ms, peak = None, None
                    record(kind="attention", backend=backend, heads=f"{n_heads}/{n_kv_heads}",
                           seq_len=seq_len, variant=variant, ms=ms, peak_bytes=peak)
                    del attention
                del model, x
                torch.cuda.empty_cache()
            if (n_heads, n_kv_heads) == (64, 8):
                continue
            model = Qwen3Model(_replace(args, n_layers=n_layers, max_seq_len=STEP_SEQ_LEN)).cuda()
            model.init_weights()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            tokens = tokens_with_documents(STEP_SEQ_LEN, eos.eos_id, "cuda")
            masks = None if backend == "sdpa" else model.get_attention_masks(tokens, eos)

            def train_step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(tokens, masks)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            ms, peak = measure(train_step, repeats=10, warmup=3)
            record(kind="step", backend=backend, heads=f"{n_heads}/{n_kv_heads}", flavor=flavor,
                   n_layers=n_layers, seq_len=STEP_SEQ_LEN, ms=ms, peak_bytes=peak,
                   tokens_per_s=STEP_SEQ_LEN / ms * 1e3)
            del model, optimizer
            torch.cuda.empty_cache()
    out.write_text("\n".join(json.dumps(r) for r in results) + "\n")


def _replace(args, **changes):
    from dataclasses import replace

    return replace(args, **changes)


def _args(base, backend):
    return _replace(base, attn_type=backend, attn_mask_type="causal" if backend == "sdpa" else "block_causal")


def repeated_kv_bytes(heads, seq_len, head_dim=128, n_layers=1):
    """Bytes of repeated K and V that the 0.2.1 path saves for backward, beyond n_kv_heads."""
    n_heads, n_kv_heads = map(int, heads.split("/"))
    return 2 * seq_len * (n_heads - n_kv_heads) * head_dim * 2 * n_layers


def report(rows, out_dir, command):
    import torch

    mib = lambda b: f"{b / 2**20:.0f}" if b is not None else "OOM"  # noqa: E731
    ms = lambda t: f"{t:.2f}" if t is not None else "OOM"  # noqa: E731
    key = lambda r: (r["kind"], r["backend"], r["heads"], r["seq_len"], r.get("variant"), r["path"])  # noqa: E731
    by = {key(r): r for r in rows}
    lines = [
        "# GQA benchmark: the 0.2.1 path vs the series vs the kernel floor", "",
        f"- device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"date {time.strftime('%Y-%m-%d')}",
        f"- command: `{command}`",
        "- raw results: [benchmark.jsonl](benchmark.jsonl); plot: [benchmark.png](benchmark.png)",
        "", "## Attention layer, forward + backward, bf16, 4 packed documents", "",
        "Qwen3 `Attention` (head_dim 128): the 0.2.1 path (repeat_kv and transposes), the series, "
        "and the floor (the series' layer with the bare kernel in the attention call). "
        "Expected saving: the repeated K/V bytes the 0.2.1 path saves for backward.", "",
        "| backend | heads | seq | 0.2.1 ms | series ms | floor ms | series/floor time | 0.2.1 MiB | series MiB | floor MiB | saved MiB | expected MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] != "attention" or r["path"] != "series" or r["variant"] != "layer":
            continue
        k = ("attention", r["backend"], r["heads"], r["seq_len"])
        old, floor = by.get(k + ("layer", "0.2.1")), by.get(k + ("floor", "series"))
        ratio = f"{r['ms'] / floor['ms']:.3f}" if r["ms"] and floor and floor["ms"] else "-"
        saved = mib(old["peak_bytes"] - r["peak_bytes"]) if old and old["peak_bytes"] and r["peak_bytes"] else "-"
        lines.append(
            f"| {r['backend']} | {r['heads']} | {r['seq_len']} | {ms(old and old['ms'])} | {ms(r['ms'])} | "
            f"{ms(floor and floor['ms'])} | {ratio} | {mib(old and old['peak_bytes'])} | {mib(r['peak_bytes'])} | "
            f"{mib(floor and floor['peak_bytes'])} | {saved} | {mib(repeated_kv_bytes(r['heads'], r['seq_len']))} |"
        )
    lines += [
        "", f"## Training step (Qwen3Model, seq {STEP_SEQ_LEN}, batch 1, AdamW, bf16 autocast)", "",
        "| backend | heads | flavor widths, layers | 0.2.1 ms | series ms | 0.2.1 tokens/s | series tokens/s | 0.2.1 GiB | series GiB | saved MiB | expected MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] != "step" or r["path"] != "series":
            continue
        old = by.get(("step", r["backend"], r["heads"], r["seq_len"], None, "0.2.1"))
        lines.append(
            f"| {r['backend']} | {r['heads']} | {r['flavor']}, {r['n_layers']} | {ms(old and old['ms'])} | {ms(r['ms'])} | "
            f"{old['tokens_per_s'] if old else 0:.0f} | {r['tokens_per_s']:.0f} | "
            f"{old['peak_bytes'] / 2**30 if old else 0:.2f} | {r['peak_bytes'] / 2**30:.2f} | "
            f"{mib(old['peak_bytes'] - r['peak_bytes']) if old else '-'} | "
            f"{mib(repeated_kv_bytes(r['heads'], r['seq_len'], n_layers=r['n_layers']))} |"
        )
    (out_dir / "benchmark.md").write_text("\n".join(lines) + "\n")
    plot(rows, out_dir / "benchmark.png")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for col, backend in enumerate(BACKENDS):
        for (path_name, variant), style in {("0.2.1", "layer"): "o--", ("series", "layer"): "s-", ("series", "floor"): "^:"}.items():
            for heads in ("32/8",):
                pts = sorted(
                    (r["seq_len"], r["ms"], r["peak_bytes"]) for r in rows
                    if r["kind"] == "attention" and r["backend"] == backend and r["heads"] == heads
                    and r["path"] == path_name and r["variant"] == variant and r["ms"]
                )
                if pts:
                    label = f"{path_name} {variant} {heads}"
                    axes[0, col].plot([p[0] for p in pts], [p[2] / 2**20 for p in pts], style, label=label)
                    axes[1, col].plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        axes[0, col].set_title(f"{backend}: peak memory (MiB)")
        axes[1, col].set_title(f"{backend}: fwd+bwd time (ms)")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--worker", choices=list(PATHS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.seq_lens, args.out)

    for name, path in PATHS.items():
        if not path.exists():
            sys.exit(f"error: {path} is missing; run 'python3 scripts/gqa_fork.py test' or materialize it first")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, path in PATHS.items():
        raw = args.out / f"benchmark-{name}.jsonl"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")]))}
        subprocess.run(
            [sys.executable, __file__, "--worker", name, "--out", str(raw), "--seq-lens", *map(str, args.seq_lens)],
            env=env, check=True,
        )
        rows += [json.loads(line) for line in raw.read_text().splitlines()]
        raw.unlink()
    (args.out / "benchmark.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(report(rows, args.out, "python3 scripts/benchmark.py " + " ".join(sys.argv[1:])))


if __name__ == "__main__":
    main()
