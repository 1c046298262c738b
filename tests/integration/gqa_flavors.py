"""Registers the train specs of the integration tests, loadable by the fork and
by the 0.2.1 path (which has no Qwen3 flex or varlen flavors) with
`--experimental.custom_import gqa_flavors`:

- "qwen3_gqa": Qwen3 debugmodel with the head layouts below, Qwen3
  debugmodel_moe ("moe", 16/8 heads), Qwen3 0.6B with its 8 KV heads
  ("0.6B") and with one ("0.6B_mqa"), and Qwen3 1.7B, 4B and 8B at their own
  sizes, all with untied output and embeddings, and debugmodel with 8/1 heads
  tied ("8q1kv_tied");
- "llama3_gqa": Llama3 debugmodel with 16 query / 8 KV heads ("16q8kv").

Each flavor comes on every backend: "<flavor>", "<flavor>_flex_attn",
"<flavor>_varlen_attn".
"""

from copy import deepcopy
from dataclasses import replace

from torchtitan.models import llama3, qwen3
from torchtitan.protocols.train_spec import register_train_spec

BACKEND_SUFFIX = {"sdpa": "", "flex": "_flex_attn", "varlen": "_varlen_attn"}
# (query heads, KV heads): TP=2 shards 16q8kv and 32q8kv; it replicates the KV
# heads of 8q1kv and 16q1kv, and TP=4 those of 16q2kv
HEAD_LAYOUTS = {
    "16q8kv": (16, 8),
    "32q8kv": (32, 8),
    "8q1kv": (8, 1),
    "16q1kv": (16, 1),
    "16q2kv": (16, 2),
}


def on_every_backend(flavors):
    # deep copies: update_from_config mutates a flavor's MoEArgs
    return {
        f"{name}{suffix}": deepcopy(
            replace(
                args,
                attn_type=attn_type,
                attn_mask_type="causal" if attn_type == "sdpa" else "block_causal",
            )
        )
        for name, args in flavors.items()
        for attn_type, suffix in BACKEND_SUFFIX.items()
    }


# Untied output and embeddings, so that the series and the 0.2.1 path train
# the same model on one GPU: 0.2.1's to_empty unties them there (and not under
# FSDP or TP), the series ties them everywhere. "8q1kv_tied" keeps them tied.
qwen3_flavors = {
    layout: replace(
        qwen3.qwen3_args["debugmodel"],
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        enable_weight_tying=False,
    )
    for layout, (n_heads, n_kv_heads) in HEAD_LAYOUTS.items()
} | {
    "8q1kv_tied": replace(qwen3.qwen3_args["debugmodel"], n_heads=8, n_kv_heads=1),
    "moe": replace(qwen3.qwen3_args["debugmodel_moe"], enable_weight_tying=False),
    # for the benchmark's Trainer runs: real sizes, and one with a single KV head
    "0.6B": replace(qwen3.qwen3_args["0.6B"], enable_weight_tying=False),
    "0.6B_mqa": replace(qwen3.qwen3_args["0.6B"], n_kv_heads=1, enable_weight_tying=False),
} | {size: replace(qwen3.qwen3_args[size], enable_weight_tying=False) for size in ("1.7B", "4B", "8B")}
register_train_spec(
    "qwen3_gqa", replace(qwen3.get_train_spec(), model_args=on_every_backend(qwen3_flavors))
)

llama3_flavors = {"16q8kv": replace(llama3.llama3_args["debugmodel"], n_kv_heads=8)}
register_train_spec(
    "llama3_gqa",
    replace(llama3.get_train_spec(), model_args=on_every_backend(llama3_flavors)),
)
