"""Registers the "qwen3_gqa" train spec: Qwen3 debugmodel with 16/8 and 32/8
query/KV heads on each backend. Both the fork and the 0.2.1 path (which has no
Qwen3 flex or varlen flavors) can load it with
`--experimental.custom_import gqa_flavors`.
"""

from dataclasses import replace

from torchtitan.models.qwen3 import get_train_spec, qwen3_args
from torchtitan.protocols.train_spec import register_train_spec

BACKEND_SUFFIX = {"sdpa": "", "flex": "_flex_attn", "varlen": "_varlen_attn"}
HEAD_LAYOUTS = {"16q8kv": 16, "32q8kv": 32}

flavors = {
    f"{layout}{suffix}": replace(
        qwen3_args["debugmodel"],
        n_heads=n_heads,
        attn_type=attn_type,
        attn_mask_type="causal" if attn_type == "sdpa" else "block_causal",
    )
    for layout, n_heads in HEAD_LAYOUTS.items()
    for attn_type, suffix in BACKEND_SUFFIX.items()
}
register_train_spec("qwen3_gqa", replace(get_train_spec(), model_args=flavors))
