"""A few Qwen3 training steps driven directly: model, loss and optimizer.

torchtitan's Trainer needs CUDA; this runs anywhere, with whichever torchtitan
is first on sys.path (the fork, or the 0.2.1 path beside it), and prints one
JSON object: the loss of every step.

    PYTHONPATH=torchtitan build/venv-0.2.1/bin/python scripts/train_steps.py --attn-type sdpa --steps 5
"""

import argparse
import itertools
import json
import os
from pathlib import Path

import torch
from gqa import positive_int
from tokenizers import Tokenizer
from torch.nn.attention.flex_attention import flex_attention
from torchtitan.models.attention import FlexAttentionWrapper
from torchtitan.models.qwen3 import Qwen3Model, Qwen3ModelArgs

DATA = Path(__file__).resolve().parent.parent / "data"
VOCAB_SIZE, HEAD_DIM = 2048, 32


class EosOnly:
    def __init__(self, eos_id: int):
        self.eos_id = eos_id


def batches(corpus: str, batch_size: int, seq_len: int):
    """Consecutive (inputs, labels) windows of the tokenized corpus, documents
    joined with EOS as torchtitan's text dataset does."""
    tokenizer = Tokenizer.from_file(str(DATA / "tokenizer" / "tokenizer.json"))
    eos_id = tokenizer.token_to_id("<|end_of_text|>")
    stream = []
    with (DATA / corpus / "train.jsonl").open() as f:
        for line in f:
            stream += tokenizer.encode(json.loads(line)["text"]).ids + [eos_id]
            if len(stream) > 64 * batch_size * (seq_len + 1):
                break
    window = batch_size * (seq_len + 1)
    for start in range(0, len(stream) - window, window):
        chunk = torch.tensor(stream[start : start + window]).view(batch_size, seq_len + 1)
        yield chunk[:, :-1], chunk[:, 1:], eos_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attn-type", choices=["sdpa", "flex", "varlen"], default="sdpa")
    parser.add_argument("--corpus", choices=["single_doc", "multi_doc"], default="single_doc")
    parser.add_argument("--n-heads", type=positive_int, default=16)
    parser.add_argument("--n-kv-heads", type=positive_int, default=8)
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--batch-size", type=positive_int, default=2)
    parser.add_argument("--forward-only", action="store_true", help="no optimizer steps (flex on CPU)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    if args.n_heads % args.n_kv_heads:
        parser.error(f"--n-heads {args.n_heads} must be a multiple of --n-kv-heads {args.n_kv_heads}")
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
    if args.attn_type == "varlen" and args.device == "cpu":
        parser.error("--attn-type varlen needs a CUDA device (varlen_attn is a CUDA kernel); pass --device cuda on a GPU machine")

    # a lower bound: the float32 logits and their gradient, and the RoPE table
    needed = args.seq_len * (args.batch_size * VOCAB_SIZE * 4 * 2 + HEAD_DIM // 2 * 8)
    memory = (
        torch.cuda.get_device_properties(0).total_memory if args.device != "cpu"
        else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    )
    if needed > memory:
        parser.error(
            f"--seq-len {args.seq_len} with --batch-size {args.batch_size} needs at least {needed / 2**30:.1f} GiB "
            f"(logits, their gradient, RoPE table), and this {args.device} has {memory / 2**30:.1f} GiB; "
            f"pass a smaller --seq-len or --batch-size"
        )
    data = list(itertools.islice(batches(args.corpus, args.batch_size, args.seq_len), args.steps))
    if len(data) < args.steps:
        parser.error(
            f"the {args.corpus} corpus holds {len(data)} batches of --batch-size {args.batch_size} x --seq-len "
            f"{args.seq_len}, fewer than --steps {args.steps}; pass fewer steps or a smaller size"
        )

    # the wrapper's max-autotune compile tunes for a minute or more per run on a
    # GPU, and a few steps gain nothing from it
    FlexAttentionWrapper._compiled_flex_attn = torch.compile(flex_attention)
    torch.manual_seed(0)
    model_args = Qwen3ModelArgs(
        vocab_size=VOCAB_SIZE, dim=256, n_layers=4, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
        head_dim=HEAD_DIM, hidden_dim=512, max_seq_len=args.seq_len,
        attn_type=args.attn_type,
        attn_mask_type="causal" if args.attn_type == "sdpa" else "block_causal",
    )
    model = Qwen3Model(model_args)
    model.init_weights()
    model.to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for inputs, labels, eos_id in data:
        inputs, labels = inputs.to(args.device), labels.to(args.device)
        masks = None if args.attn_type == "sdpa" else model.get_attention_masks(inputs, EosOnly(eos_id))
        with torch.set_grad_enabled(not args.forward_only):
            logits = model(inputs, masks)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        if not args.forward_only:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    print(json.dumps({"losses": losses}))


if __name__ == "__main__":
    main()
