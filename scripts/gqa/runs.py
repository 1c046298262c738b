"""Training runs against a fork: the model, loss and optimizer driven directly
(scripts/train_steps.py, any device), and torchtitan's Trainer (CUDA); one
pool that hands out GPU sets to runs that go at once; their loss tables; and
the main job, a short Qwen3 training on every backend the machine supports."""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Hashable, TypeVar

from gqa import ForkError, last_line
from gqa.bases import Base, ROOT
from gqa.install import fork_imports_from_root

CONFIGS = ROOT / "configs"
BACKENDS = ("sdpa", "flex", "varlen")

Job = TypeVar("Job", bound=Hashable)


def fork_env(fork: Path, *extra_paths: Path) -> dict:
    """The environment for a process that must import this fork's torchtitan."""
    paths = [str(fork), *map(str, extra_paths), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def step_losses(base: Base, fork: Path, *args: str) -> list[float]:
    """Losses of scripts/train_steps.py run against `fork` (the base's fork or
    its release path) in the base's environment."""
    proc = subprocess.run(
        [str(base.python), str(ROOT / "scripts" / "train_steps.py"), *args],
        env=fork_env(fork), capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise ForkError(f"train_steps.py {' '.join(args)} failed with {fork}: {last_line(proc.stderr)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["losses"]


def run_trainer(
    base: Base, fork: Path, config: Path, dump: Path, overrides: list[str], nproc: int = 1, gpus: str | None = None
) -> str:
    """torchtitan's Trainer run from `fork` in the base's environment on
    `nproc` GPUs (those of CUDA_VISIBLE_DEVICES `gpus`, if given); its log,
    also at dump/train.log."""
    dump.mkdir(parents=True, exist_ok=True)
    log = dump / "train.log"
    env = fork_env(fork, ROOT / "tests" / "integration")
    # NVLink multicast off: on shared hosts it can take the GPUs out of service
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    with log.open("w") as out:
        proc = subprocess.run(
            [str(base.python), "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
             # rank 0's log: every rank logs the same step metrics
             "--tee=3", "--local-ranks-filter=0",
             "-m", "torchtitan.train", f"--job.config_file={config}", f"--job.dump_folder={dump}",
             *overrides],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0:
        errors = re.findall(r"^.*\w(?:Error|Exception): .*$", log.read_text(), re.M)
        reason = f" ({errors[-1].strip()})" if errors else ""
        raise ForkError(f"the Trainer failed with {config.name} {' '.join(overrides)}{reason}; see {log}")
    return re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())


def trainer_metric(log: str, name: str) -> list[float]:
    """One of the per-step metrics the Trainer logs: loss, memory (GiB reserved) or tps."""
    values = re.findall(rf"step:\s*\d+\s.*?{name}:\s*([\d.,]+)", log)
    return [float(value.replace(",", "")) for value in values]


def trainer_losses(base: Base, fork: Path, config: Path, dump: Path, overrides: list[str], **kwargs) -> list[float]:
    """Per-step losses of a run_trainer run."""
    losses = trainer_metric(run_trainer(base, fork, config, dump, overrides, **kwargs), "loss")
    if not losses:
        raise ForkError(f"the Trainer logged no loss; see {dump / 'train.log'}")
    return losses


def on_gpu_sets(
    jobs: list[Job],
    run: Callable[[Job, str], object],
    gpus_of: Callable[[Job], int],
    gpu_count: int,
    runs_per_set: int = 1,
) -> dict[Job, object]:
    """run(job, gpus) for every job whose GPUs this machine has, at most
    `runs_per_set` at once on each set of gpus_of(job) GPUs (gpus: a
    CUDA_VISIBLE_DEVICES string); {job: what run returned}. The largest jobs
    start first, so that the small ones fill the gaps."""
    sizes = {gpus_of(job) for job in jobs if gpus_of(job) <= gpu_count}
    free = {n: queue.Queue() for n in sizes}
    for n, sets in free.items():
        for first, _ in itertools.product(range(0, gpu_count - n + 1, n), range(runs_per_set)):
            sets.put(",".join(map(str, range(first, first + n))))

    def take(job):
        gpus = free[gpus_of(job)].get()
        try:
            return run(job, gpus)
        finally:
            free[gpus_of(job)].put(gpus)

    todo = sorted((job for job in jobs if gpus_of(job) in sizes), key=lambda job: -gpus_of(job))
    if not todo:
        return {}
    with ThreadPoolExecutor(max_workers=sum(q.qsize() for q in free.values())) as pool:
        return dict(zip(todo, pool.map(take, todo)))


def loss_table(losses: dict[str, list[float]]) -> str:
    names = list(losses)
    lines = ["| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for step in range(max(map(len, losses.values()))):
        cells = [f"{losses[n][step]:.4f}" if step < len(losses[n]) else "" for n in names]
        lines.append(f"| {step + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cuda_available(base: Base) -> bool:
    proc = subprocess.run(
        [str(base.python), "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True
    )
    return proc.stdout.strip() == "True"


def main_job(base: Base, steps: int) -> str:
    """Qwen3 debugmodel on every backend this machine can train, losses side
    by side, from this checkout's fork as installed into the base's environment."""
    if not (base.python.exists() and fork_imports_from_root(base)):
        raise ForkError(
            f"this checkout's fork {base.fork} is not installed in {base.venv}, so training would not run it; "
            f"run 'python3 scripts/gqa_fork.py setup' (materialize + install + train)"
        )
    if cuda_available(base):
        with tempfile.TemporaryDirectory() as tmp:
            losses = {
                backend: trainer_losses(
                    base, base.fork, CONFIGS / f"qwen3_debugmodel_{backend}.toml", Path(tmp) / backend,
                    [f"--training.steps={steps}"],
                )
                for backend in BACKENDS
            }
        print(loss_table(losses))
        return f"trained Qwen3 debugmodel with torchtitan's Trainer on {', '.join(BACKENDS)}"
    losses = {"sdpa": step_losses(base, base.fork, "--attn-type=sdpa", f"--steps={steps}")}
    flex = step_losses(base, base.fork, "--attn-type=flex", "--steps=1", "--forward-only")
    print(loss_table(losses))
    print(f"flex, forward only at the initial weights: {flex[0]:.4f} (sdpa: {losses['sdpa'][0]:.4f})")
    return (
        "no CUDA device: trained sdpa with the model, loss and optimizer driven directly "
        "(torchtitan's Trainer needs CUDA); skipped flex training (flex_attention has no "
        "backward on CPU) and varlen (varlen_attn is a CUDA kernel)"
    )
