"""Bugs the series must never ship, each applied to a scratch copy of the fork:
the test meant to catch it must fail. Several of them once left every test
green; a mutation whose code the series no longer has fails here, so this list
follows the series.
"""

import os
import subprocess
import sys

import pytest
import torch

from gqa.bases import BASES, DEFAULT

MODELS = "torchtitan/models"
# name: (file, code, mutated code, the fork's test that must fail)
MUTATIONS = {
    "qwen3 sdpa arm without its output transpose": (
        f"{MODELS}/qwen3/model/model.py",
        "                    scale=self.scaling,\n                ).transpose(1, 2)\n            case _:",
        "                    scale=self.scaling,\n                )\n            case _:",
        "tests/unit_tests/test_attention_arms.py",
    ),
    "llama3 sdpa arm without its output transpose": (
        f"{MODELS}/llama3/model/model.py",
        "                    xv.transpose(1, 2),\n                ).transpose(1, 2)\n            case _:",
        "                    xv.transpose(1, 2),\n                )\n            case _:",
        "tests/unit_tests/test_attention_arms.py",
    ),
    "llama3 varlen arm with heads and head_dim swapped (#2223)": (
        f"{MODELS}/llama3/model/model.py",
        "output = self.inner_attention(xq, xk, xv, attention_masks)",
        "output = self.inner_attention(xq, xk, xv, attention_masks).transpose(2, 3)",
        "tests/unit_tests/test_attention_arms.py",
    ),
    "llama4 arms without their output transpose": (
        f"{MODELS}/llama4/model/model.py",
        "output = output.transpose(\n            1, 2\n        ).contiguous()",
        "output = output.contiguous()",
        "tests/unit_tests/test_attention_arms.py",
    ),
    "sdpa GQA without the FLASH_ATTENTION condition": (
        f"{MODELS}/attention.py",
        "SDPBackend.FLASH_ATTENTION in sdpa_backends\n        and ",
        "",
        "tests/unit_tests/test_gqa_attention.py",
    ),
    "sdpa GQA decided from q's dtype under autocast": (
        f"{MODELS}/attention.py",
        "torch.get_autocast_dtype(device_type)\n            if torch.is_autocast_enabled(device_type)\n            else q.dtype",
        "q.dtype",
        "tests/unit_tests/test_gqa_attention.py",
    ),
    "varlen given DTensors under tensor parallel": (
        f"{MODELS}/attention.py",
        "    @_on_local_heads(dim=2)\n",
        "",
        "tests/unit_tests/test_tensor_parallel_attention.py",
    ),
    "replicated KV heads' gradients not summed over the ranks": (
        "torchtitan/distributed/tensor_parallel.py",
        "output = outputs.to_local(grad_placements=(Partial(),))",
        "output = outputs.to_local()",
        "tests/unit_tests/test_tensor_parallel_attention.py",
    ),
    "qwen3 without the head count check": (
        f"{MODELS}/qwen3/model/model.py",
        "        check_head_counts(self.n_heads, self.n_kv_heads)\n",
        "",
        "tests/unit_tests/test_head_counts.py",
    ),
}
# the autocast decision shows only in which CUDA kernel runs
NEEDS_CUDA = {"sdpa GQA decided from q's dtype under autocast"}


@pytest.mark.parametrize("name", MUTATIONS)
def test_mutation_fails_its_test(tmp_path, name):
    if name in NEEDS_CUDA and not torch.cuda.is_available():
        pytest.skip("caught by a CUDA kernel test")
    path, code, mutated, test = MUTATIONS[name]
    scratch = tmp_path / "torchtitan"
    scratch.mkdir()
    archive = subprocess.run(["git", "-C", BASES[DEFAULT].fork, "archive", "HEAD"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", scratch], input=archive, check=True)
    source = scratch / path
    text = source.read_text()
    assert text.count(code) == 1, f"{name}: the code it mutates is not in {path} once; update MUTATIONS"
    source.write_text(text.replace(code, mutated))

    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test],
        cwd=scratch, env={**os.environ, "PYTHONPATH": str(scratch)}, capture_output=True, text=True,
    )
    # 1: tests ran and failed (not an import or collection error, which is 2+)
    assert proc.returncode == 1, f"{name}: {test} exited {proc.returncode}\n{proc.stdout[-3000:]}"
