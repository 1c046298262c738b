"""Bugs the series must never ship, each applied to a scratch copy of the fork.
The fork test meant to catch one must pass on the fork as it is and fail on
the mutated copy, in that test and for its reason (a failure whose report
holds the mutation's reason, not an error in set-up, import or collection).
A mutation whose code the series no longer has fails here, so this list
follows the series.
"""

import functools
import os
import re
import subprocess
from typing import NamedTuple

import pytest
import torch

from gqa.fork import archive
from gqa.bases import BASES, DEFAULT
from gqa.suites import fork_report, junit_outcomes, unmet_requirement

MODELS = "torchtitan/models"
ATTENTION = f"{MODELS}/attention.py"
TENSOR_PARALLEL = "torchtitan/distributed/tensor_parallel.py"
TESTS = "tests/unit_tests"
COMMON_ATTENTION = "torchtitan/models/common/attention.py"
COMMON_DECODER = "torchtitan/models/common/decoder.py"
SHARED_KV_HEADS = f"{TESTS}/test_tp_kv_head_replication.py::test_shared_kv_heads_train_as_one_process_on_four_ranks"
SHARED_KV_HEADS_SPMD_TYPES = f"{SHARED_KV_HEADS}[spmd_types]"
SHARED_KV_HEADS_PARTIAL_DTENSOR = f"{SHARED_KV_HEADS}[partial_dtensor]"
# the reasons fork tests give when they catch a bug
LAYOUT = "is above .* twice that of the same attention"
REPEATED = r"K/V reach the kernel with \d+ heads, not n_kv_heads"
NOT_CLOSE = "Tensor-likes are not close"
NOT_REFUSED = "DID NOT RAISE"


class Mutation(NamedTuple):
    path: str
    code: str
    mutated: str
    # the fork test that must catch it, as pytest selects it
    test: str
    # what its failure report must hold
    reason: str
    needs_cuda: bool = False
    # the release whose fork it mutates
    base: str = DEFAULT


MUTATIONS = {
    "qwen3 sdpa arm without its output transpose": Mutation(
        f"{MODELS}/qwen3/model/model.py",
        "                    scale=self.scaling,\n                ).transpose(1, 2)\n            case _:",
        "                    scale=self.scaling,\n                )\n            case _:",
        f"{TESTS}/test_attention_arms.py::test_attention_arm_matches_reference",
        LAYOUT,
    ),
    "llama3 sdpa arm without its output transpose": Mutation(
        f"{MODELS}/llama3/model/model.py",
        "                    xv.transpose(1, 2),\n                ).transpose(1, 2)\n            case _:",
        "                    xv.transpose(1, 2),\n                )\n            case _:",
        f"{TESTS}/test_attention_arms.py::test_attention_arm_matches_reference",
        LAYOUT,
    ),
    "llama3 varlen arm with heads and head_dim swapped (#2223)": Mutation(
        f"{MODELS}/llama3/model/model.py",
        "output = self.inner_attention(xq, xk, xv, attention_masks)",
        "output = self.inner_attention(xq, xk, xv, attention_masks).transpose(2, 3)",
        f"{TESTS}/test_attention_arms.py::test_attention_arm_matches_reference",
        LAYOUT,
    ),
    "llama4 arms without their output transpose": Mutation(
        f"{MODELS}/llama4/model/model.py",
        "output = output.transpose(\n            1, 2\n        ).contiguous()",
        "output = output.contiguous()",
        f"{TESTS}/test_attention_arms.py::test_attention_arm_matches_reference",
        LAYOUT,
    ),
    "flex given K/V repeated to n_heads": Mutation(
        ATTENTION,
        "            k,\n            v,\n            block_mask=block_mask,",
        "            k.repeat_interleave(q.shape[1] // k.shape[1], dim=1),\n"
        "            v.repeat_interleave(q.shape[1] // v.shape[1], dim=1),\n"
        "            block_mask=block_mask,",
        f"{TESTS}/test_unrepeated_kv.py",
        REPEATED,
    ),
    "sdpa repeating K/V whatever the GQA decision says": Mutation(
        ATTENTION,
        "        if n_rep > 1 and not enable_gqa:\n",
        "        if n_rep > 1:\n",
        f"{TESTS}/test_unrepeated_kv.py",
        REPEATED,
    ),
    "llama3 arms repeating K/V": Mutation(
        f"{MODELS}/llama3/model/model.py",
        "        # xk, xv: (bs, seqlen, n_local_kv_heads, head_dim)\n",
        "        xk, xv = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2) for t in (xk, xv))\n",
        f"{TESTS}/test_unrepeated_kv.py",
        REPEATED,
    ),
    "llama4 arms repeating K/V": Mutation(
        f"{MODELS}/llama4/model/model.py",
        "        xv = xv.transpose(1, 2)  # (bs, n_local_kv_heads, seqlen, head_dim)\n",
        "        xv = xv.transpose(1, 2)  # (bs, n_local_kv_heads, seqlen, head_dim)\n"
        "        xk, xv = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (xk, xv))\n",
        f"{TESTS}/test_unrepeated_kv.py",
        REPEATED,
    ),
    "sdpa GQA without the FLASH_ATTENTION condition": Mutation(
        ATTENTION,
        "SDPBackend.FLASH_ATTENTION in sdpa_backends\n        and ",
        "",
        f"{TESTS}/test_gqa_attention.py::test_sdpa_gqa_needs_cuda_and_the_flash_backend",
        "assert True is False",
    ),
    "sdpa GQA call free to fall back to the math kernel": Mutation(
        ATTENTION,
        "        with sdpa_kernel(backends, set_priority=True):",
        "        with sdpa_kernel(self.sdpa_backends, set_priority=True):",
        f"{TESTS}/test_gqa_attention.py::test_sdpa_gqa_call_that_no_gqa_kernel_takes_raises",
        NOT_REFUSED,
    ),
    "sdpa GQA decided past flash's head_dim limit": Mutation(
        ATTENTION,
        "        and head_dim <= 256\n",
        "        and head_dim <= 512\n",
        f"{TESTS}/test_gqa_attention.py::test_sdpa_gqa_decision_is_torchs_flash_check",
        "assert True is False",
        needs_cuda=True,
    ),
    "sdpa GQA decided from q's dtype under autocast": Mutation(
        ATTENTION,
        "torch.get_autocast_dtype(device_type)\n            if torch.is_autocast_enabled(device_type)\n            else q.dtype",
        "q.dtype",
        f"{TESTS}/test_gqa_attention.py::test_sdpa_never_runs_math",
        "AssertionError",
        needs_cuda=True,
    ),
    "sdpa GQA on ROCm's flash kernels": Mutation(
        ATTENTION,
        " and torch.version.hip is None",
        "",
        f"{TESTS}/test_gqa_attention.py::test_sdpa_repeats_kv_on_rocm",
        "assert not True",
    ),
    "varlen causal spelled as torch before 2.11 takes it": Mutation(
        ATTENTION,
        '    if "window_size" in inspect.signature(kernel).parameters:\n',
        "    if False:\n",
        f"{TESTS}/test_varlen_attention.py::test_varlen_matches_reference",
        "unexpected keyword argument 'is_causal'",
    ),
    "qwen3 flex masks made on the default device": Mutation(
        f"{MODELS}/qwen3/model/model.py",
        "            device=input_batch.device,\n",
        "",
        f"{TESTS}/test_attention_masks.py",
        r"\[None\]",
    ),
    "qwen3 without the head count check": Mutation(
        f"{MODELS}/qwen3/model/model.py",
        "        check_head_counts(self.n_heads, self.n_kv_heads)\n",
        "",
        f"{TESTS}/test_head_counts.py::test_heads_that_do_not_group_fail_when_the_model_is_built",
        NOT_REFUSED,
    ),
    "qwen3 TP plan handing attention DTensor queries, as 0.2.1's did": Mutation(
        f"{MODELS}/qwen3/infra/parallelize.py",
        '"attention.q_norm": SequenceParallel(\n                sequence_dim=2, use_local_output=True\n',
        '"attention.q_norm": SequenceParallel(\n                sequence_dim=2,\n',
        f"{TESTS}/test_tensor_parallel_attention.py::test_tensor_parallel_matches_one_process",
        "got mixed torch.Tensor and DTensor",
    ),
    "mixed precision said to apply under PP without FSDP": Mutation(
        "torchtitan/distributed/utils.py",
        "    return parallel_dims.fsdp_enabled or not (\n"
        "        parallel_dims.tp_enabled or parallel_dims.pp_enabled\n    )",
        "    return parallel_dims.fsdp_enabled or not parallel_dims.tp_enabled",
        f"{TESTS}/test_tensor_parallel_attention.py::test_varlen_is_refused_where_training_computes_in_float32",
        NOT_REFUSED,
    ),
    "replicated KV heads' gradients not summed over the ranks": Mutation(
        TENSOR_PARALLEL,
        "output = outputs.to_local(grad_placements=(Partial(),))",
        "output = outputs.to_local()",
        f"{TESTS}/test_tensor_parallel_attention.py::test_tensor_parallel_matches_one_process",
        NOT_CLOSE,
    ),
    "a replicated KV head given to the wrong ranks": Mutation(
        TENSOR_PARALLEL,
        "kv_head = device_mesh.get_local_rank() // (tp // self.n_kv_heads)",
        "kv_head = device_mesh.get_local_rank() % self.n_kv_heads",
        f"{TESTS}/test_tensor_parallel_attention.py::test_replicated_kv_heads_match_one_process_and_checkpoint_across_tp",
        NOT_CLOSE,
    ),
    "TP degrees not checked against the heads": Mutation(
        TENSOR_PARALLEL,
        "    if tp_degree not in degrees:\n",
        "    if False:\n",
        f"{TESTS}/test_head_counts.py::test_parallelize_refuses_tp_degrees_that_part_kv_heads_from_their_queries",
        "Regex pattern did not match|ZeroDivisionError|" + NOT_REFUSED,
    ),
    "ReplicateKVHeads given a mesh smaller than n_kv_heads": Mutation(
        TENSOR_PARALLEL,
        "        if device_mesh.ndim != 1 or tp % self.n_kv_heads != 0:\n",
        "        if False:\n",
        f"{TESTS}/test_head_counts.py::test_replicate_kv_heads_refuses_a_mesh_smaller_than_n_kv_heads",
        "ZeroDivisionError",
    ),
    "float8 tensorwise TP given replicated KV heads": Mutation(
        TENSOR_PARALLEL,
        "    if float8_tensorwise:\n",
        "    if False:\n",
        f"{TESTS}/test_head_counts.py::test_parallelize_refuses_float8_tensorwise_tp_with_replicated_kv_heads",
        NOT_REFUSED,
    ),
    "qwen3 output untied from its embeddings by to_empty": Mutation(
        f"{MODELS}/qwen3/model/model.py",
        "            self.output.weight = self.tok_embeddings.weight\n        if self.tok_embeddings is not None:",
        "            pass\n        if self.tok_embeddings is not None:",
        f"{TESTS}/test_weight_tying.py",
        "no longer tied to tok_embeddings",
    ),
    "Partial gradients clipped without their sum": Mutation(
        "torchtitan/distributed/utils.py",
        "        parameters = list(parameters)\n    _sum_partial_grads(parameters)\n",
        "        parameters = list(parameters)\n",
        f"{TESTS}/test_clip_grad_norm.py",
        "a partial sum",
    ),
    "Partial gradients relabelled as replicated without their sum": Mutation(
        "torchtitan/distributed/utils.py",
        "            p.grad = grad.redistribute(placements=placements)",
        "            p.grad = DTensor.from_local(grad.to_local(), grad.device_mesh, placements)",
        f"{TESTS}/test_clip_grad_norm.py",
        "are not close",
    ),
    "FA4 varlen run without the causal mask": Mutation(
        f"{MODELS}/fa4_varlen.py",
        "        softmax_scale=scale,\n        causal=True,\n        return_lse=True,",
        "        softmax_scale=scale,\n        causal=False,\n        return_lse=True,",
        f"{TESTS}/test_varlen_fa4.py::test_fa4_path_matches_reference",
        LAYOUT,
    ),
    "FA4 varlen lse traced with the wrong layout": Mutation(
        f"{MODELS}/fa4_varlen.py",
        "(q.shape[1], q.shape[0]), dtype=torch.float32",
        "(q.shape[0], q.shape[1]), dtype=torch.float32",
        f"{TESTS}/test_varlen_fa4.py::test_fa4_ops_meet_the_custom_op_contract",
        "test_faketensor failed",
    ),
    "qwen3 FA4 forward recomputed under per-op SAC": Mutation(
        f"{MODELS}/qwen3/infra/parallelize.py",
        "    torch.ops.torchtitan.fa4_varlen_forward.default,\n",
        "",
        f"{TESTS}/test_varlen_fa4.py::test_fa4_forward_is_saved_under_per_op_sac",
        "per-op SAC recomputed it",
    ),
    "llama3 FA4 forward recomputed under per-op SAC": Mutation(
        f"{MODELS}/llama3/infra/parallelize.py",
        "    torch.ops.torchtitan.fa4_varlen_forward.default,\n",
        "",
        f"{TESTS}/test_varlen_fa4.py::test_fa4_forward_is_saved_under_per_op_sac",
        "per-op SAC recomputed it",
    ),
    "FA4 asked for by name quietly replaced by the built-in kernel": Mutation(
        ATTENTION,
        '    if kernel == "fa4" and (reason := fa4_unavailable_reason()):\n',
        '    if kernel == "fa4" and (reason := fa4_unavailable_reason()):\n        return "builtin"\n',
        f"{TESTS}/test_varlen_fa4.py::test_fa4_is_refused_where_it_cannot_run",
        NOT_REFUSED,
    ),
    "FA4 run on ROCm": Mutation(
        f"{MODELS}/fa4_varlen.py",
        "    if torch.version.hip is not None:\n",
        "    if False:\n",
        f"{TESTS}/test_varlen_fa4.py::test_fa4_is_unavailable_on_rocm",
        "NoneType",
    ),
    "FA4 run with an untested flash-attn-4": Mutation(
        f"{MODELS}/fa4_varlen.py",
        "    if not oldest <= TorchVersion(version) <= newest:\n",
        "    if False:\n",
        f"{TESTS}/test_varlen_fa4.py::test_fa4_is_unavailable_with_an_untested_flash_attn_4",
        "NoneType",
    ),
    "0.3.0: the TP check without the degrees that work": Mutation(
        COMMON_DECODER,
        'f"tensor_parallel_degree ({tp}) {problem}; use one of {degrees}"',
        'f"tensor_parallel_degree ({tp}) {problem}"',
        f"{TESTS}/test_tp_degrees.py::test_tp_degrees_that_split_heads_are_refused_with_those_that_work",
        "Regex pattern did not match",
        base="0.3.0",
    ),
    "0.3.0: LoRA's frozen base weights made trainable by spmd_types": Mutation(
        "torchtitan/protocols/module.py",
        "nn.Parameter(tensor, requires_grad=requires_grad)",
        "nn.Parameter(tensor)",
        f"{TESTS}/test_spmd_frozen_parameters.py",
        r"AssertionError: \['layers",
        base="0.3.0",
    ),
    "0.3.0: TP degrees past n_kv_heads refused": Mutation(
        COMMON_DECODER,
        "would_share = n_heads % tp == 0 and tp % n_kv_heads == 0",
        "would_share = False",
        f"{TESTS}/test_tp_degrees.py::test_qwen35_registered_configs_set_up_past_n_kv_heads",
        "or be a multiple of it",
        base="0.3.0",
    ),
    "0.3.0: ranks given another KV head than their query heads attend to": Mutation(
        COMMON_ATTENTION,
        "return SharedKVHead(ranks, tp_rank // ranks, tp_rank % ranks)",
        "return SharedKVHead(ranks, tp_rank % ranks, tp_rank % ranks)",
        SHARED_KV_HEADS_SPMD_TYPES,
        NOT_CLOSE,
        base="0.3.0",
    ),
    "0.3.0: every rank sharing a fused KV group given its first query heads": Mutation(
        COMMON_ATTENTION,
        "q_start = group + shared.index * q_heads",
        "q_start = group",
        SHARED_KV_HEADS_PARTIAL_DTENSOR,
        NOT_CLOSE,
        base="0.3.0",
    ),
    "0.3.0: a shared KV head's gradient taken as replicated, not partial": Mutation(
        COMMON_ATTENTION,
        "x_BLF.to_local(grad_placements=_with_tp_placement(x_BLF, Partial()))",
        "x_BLF.to_local()",
        SHARED_KV_HEADS_PARTIAL_DTENSOR,
        NOT_CLOSE,
        base="0.3.0",
    ),
    "0.3.0: spmd_types gathers a shared KV head without summing its gradient": Mutation(
        COMMON_ATTENTION,
        "        dst=spmd.R,\n        backward_options",
        "        dst=spmd.I,\n        backward_options",
        SHARED_KV_HEADS_SPMD_TYPES,
        NOT_CLOSE,
        base="0.3.0",
    ),
    "0.3.0: Muse Glimmer's attention, untested with shared KV heads, let past n_kv_heads": Mutation(
        "torchtitan/models/muse_glimmer/model.py",
        "        shares_kv_heads: ClassVar[bool] = False\n",
        "",
        f"{TESTS}/test_tp_degrees.py::test_attention_that_does_not_share_kv_heads_keeps_the_old_limit",
        NOT_REFUSED,
        base="0.3.0",
    ),
    "0.3.0: Qwen3.5's ranks all attending to the first KV head": Mutation(
        "torchtitan/models/qwen3_5/model.py",
        "            kv_head = (shared.kv_head, shared.kv_head + 1)\n",
        "            kv_head = (0, 1)\n",
        SHARED_KV_HEADS_SPMD_TYPES,
        NOT_CLOSE,
        base="0.3.0",
    ),
}


def scratch_fork(base, folder):
    """The committed tree of `base`'s fork, in `folder`."""
    return archive(base.fork, "HEAD", folder)


def run_fork_tests(base, fork, tests, report):
    """pytest over `tests` in `fork`, in the base's environment; the outcome of each test."""
    subprocess.run(
        [base.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *tests],
        cwd=fork, env={**os.environ, "PYTHONPATH": str(fork)}, capture_output=True, text=True,
    )
    return junit_outcomes(report)


def selected(outcomes, test):
    """The outcomes of the tests that `test` (a file, or file::function) selects;
    junit reports name them by module (tests.unit_tests.test_x::function)."""
    module_test = test.replace(".py", "").replace("/", ".")
    return {
        test_id: outcome for test_id, outcome in outcomes.items()
        if re.match(rf"{re.escape(module_test)}(\[|::|$)", test_id)
    }


@pytest.fixture(scope="session")
def unmutated(tmp_path_factory):
    """{base: every guarding test's outcomes on its fork as it is}: from the
    report of the fork's tests that `gqa_fork.py test` ran just before on this
    very commit, where it has them all; else from a run of them here."""

    @functools.cache
    def outcomes_of(version):
        base = BASES[version]
        tests = sorted({m.test for m in MUTATIONS.values() if m.base == version})
        head = subprocess.run(["git", "-C", base.fork, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        clean = not subprocess.run(["git", "-C", base.fork, "status", "--porcelain"], capture_output=True, text=True).stdout
        report = fork_report(base, head)
        if clean and report.exists():
            outcomes = junit_outcomes(report)
            if all(selected(outcomes, test) for test in tests):
                return outcomes
        folder = tmp_path_factory.mktemp(f"unmutated-{version}")
        return run_fork_tests(base, scratch_fork(base, folder / "torchtitan"), tests, folder / "report.xml")

    return outcomes_of


@pytest.mark.parametrize("name", MUTATIONS)
def test_mutation_fails_its_test(tmp_path, unmutated, name):
    mutation = MUTATIONS[name]
    if mutation.needs_cuda and not torch.cuda.is_available():
        pytest.skip("caught by a CUDA kernel test; this machine has no CUDA device")
    base = BASES[mutation.base]
    cannot = unmet_requirement(base)
    if cannot or not base.fork.exists():
        pytest.skip(f"torchtitan {base.version}'s fork cannot run here: {cannot or 'it is not materialized'}")
    before = selected(unmutated(mutation.base), mutation.test)
    assert before, f"{name}: {mutation.test} selects no test of the fork"
    assert all(outcome.kind in ("passed", "skipped") for outcome in before.values()), (
        f"{name}: {mutation.test} fails on the fork as it is:\n{before}"
    )
    assert any(outcome.kind == "passed" for outcome in before.values()), f"{name}: every test of {mutation.test} skipped"

    fork = scratch_fork(base, tmp_path / "torchtitan")
    source = fork / mutation.path
    text = source.read_text()
    assert text.count(mutation.code) == 1, f"{name}: the code it mutates is not in {mutation.path} once; update MUTATIONS"
    source.write_text(text.replace(mutation.code, mutation.mutated))

    after = selected(run_fork_tests(base, fork, [mutation.test], tmp_path / "report.xml"), mutation.test)
    assert after, f"{name}: {mutation.test} selects no test of the mutated fork (did collection fail?)"
    failures = [outcome for outcome in after.values() if outcome.kind in ("failure", "error")]
    assert failures, f"{name}: every test of {mutation.test} passed on the mutated fork"
    errors = [outcome.report for outcome in failures if outcome.kind == "error"]
    assert not errors, f"{name}: a set-up error, not a failure:\n{errors[0][:3000]}"
    assert any(re.search(mutation.reason, outcome.report) for outcome in failures), (
        f"{name}: {mutation.test} failed, but not for its reason ({mutation.reason}):\n{failures[0].report[:3000]}"
    )
