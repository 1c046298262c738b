"""FlashAttention-4 against torch's built-in varlen kernel (FlashAttention-2), one GPU.

Needs the series fork installed (`gqa_fork.py install`, into build/venv-0.2.1) and flash-attn-4 on an
sm90+ GPU; writes docs/varlen-fa4.jsonl and the table docs/varlen-fa4.md:

    build/venv-0.2.1/bin/python scripts/benchmark_fa4.py [--seq-lens 8192 32768] [--out docs]

Attention call: the series' VarlenAttentionWrapper, forward + backward, bf16,
packed documents, head_dim 128. Training step: Qwen3Model with the 4B widths
and STEP_LAYERS of its layers, each block compiled as the Trainer compiles it.
"""

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmark import DOCUMENTS, documents, EOS_ID, measure, SLEEP_CYCLES, training_step

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ("builtin", "fa4")
HEADS = ((16, 8), (32, 8))
HEAD_DIM = 128
STEP_FLAVOR, STEP_LAYERS = "4B", 6


def attention_flops(seq_len, n_heads):
    """Forward + backward matmul FLOPs of causal attention over DOCUMENTS equal
    documents: forward 2 matmuls, backward 5, each 2 * len^2 * head_dim per
    head, halved by the causal mask."""
    doc_len = seq_len // DOCUMENTS
    return 7 * 2 * doc_len**2 * HEAD_DIM * n_heads * DOCUMENTS / 2


def attention_call(wrapper, seq_len, n_heads, n_kv_heads, masks):
    q = torch.randn(1, seq_len, n_heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, seq_len, n_kv_heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)
    return lambda: wrapper(q, k, v, masks).backward(grad)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    from torchtitan.models.attention import create_varlen_metadata_for_document, VarlenAttentionWrapper
    from torchtitan.models.fa4_varlen import fa4_unavailable_reason
    from torchtitan.models.qwen3 import qwen3_args
    from torchtitan.models.qwen3.model.model import Qwen3Model

    if reason := fa4_unavailable_reason():
        sys.exit(f"error: FA4 cannot run here ({reason})")
    device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    rows = []

    def record(fn, **row):
        try:
            row |= measure(fn, SLEEP_CYCLES[row["kind"]])
        except torch.OutOfMemoryError:
            row |= {"ms": None, "times": None, "peak_bytes": None, "call_bytes": None}
        rows.append(row | {"device": device})
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()

    for seq_len in args.seq_lens:
        tokens = documents(seq_len)
        masks = create_varlen_metadata_for_document(tokens, EOS_ID)
        for (n_heads, n_kv_heads), kernel in ((h, k) for h in HEADS for k in KERNELS):
            wrapper = VarlenAttentionWrapper(kernel)
            record(attention_call(wrapper, seq_len, n_heads, n_kv_heads, masks), kind="attention",
                   kernel=kernel, heads=f"{n_heads}/{n_kv_heads}", seq_len=seq_len,
                   flops=attention_flops(seq_len, n_heads))
        for kernel in KERNELS:
            model_args = replace(qwen3_args[STEP_FLAVOR], attn_type="varlen", attn_mask_type="block_causal",
                                 varlen_kernel=kernel, max_seq_len=seq_len, n_layers=STEP_LAYERS)
            torch._dynamo.reset()
            record(training_step(Qwen3Model, model_args, tokens, masks, variant="compile"), kind="step",
                   kernel=kernel, heads=f"{model_args.n_heads}/{model_args.n_kv_heads}", seq_len=seq_len)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "varlen-fa4.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = "\n".join(table(rows, device, "python3 scripts/benchmark_fa4.py " + " ".join(sys.argv[1:])))
    (args.out / "varlen-fa4.md").write_text(report + "\n")
    print(report)


def table(rows, device, command):
    cell = {(r["kind"], r["kernel"], r["heads"], r["seq_len"]): r for r in rows}
    yield "# varlen: FlashAttention-4 against torch's built-in kernel (FlashAttention-2)"
    yield ""
    yield f"{device}; measured by `{command}`. Time: GPU time, median of 10 after 3 warm-up calls."
    yield ""
    yield f"Attention call: VarlenAttentionWrapper forward + backward, bf16, {DOCUMENTS} documents, head_dim {HEAD_DIM}."
    yield f"Step: Qwen3Model, {STEP_FLAVOR} widths, {STEP_LAYERS} layers, each block compiled (fullgraph), AdamW."
    yield ""
    yield "| part | heads | seq | FA2 ms | FA4 ms | FA4 speed-up | FA2 TFLOP/s | FA4 TFLOP/s | FA2 MiB | FA4 MiB |"
    yield "|---|---|---|---|---|---|---|---|---|---|"
    for kind, heads, seq_len in dict.fromkeys((r["kind"], r["heads"], r["seq_len"]) for r in rows):
        fa2, fa4 = (cell[kind, kernel, heads, seq_len] for kernel in KERNELS)
        if fa2["ms"] is None or fa4["ms"] is None:
            yield f"| {kind} | {heads} | {seq_len} | OOM in one of them |||||||"
            continue
        tflops = [f"{r['flops'] / r['ms'] / 1e9:.0f}" if "flops" in r else "" for r in (fa2, fa4)]
        memory = "call_bytes" if kind == "attention" else "peak_bytes"
        yield (f"| {kind} | {heads} | {seq_len} | {fa2['ms']:.2f} | {fa4['ms']:.2f} | {fa2['ms'] / fa4['ms']:.2f}x"
               f" | {tflops[0]} | {tflops[1]} | {fa2[memory] / 2**20:.0f} | {fa4[memory] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
