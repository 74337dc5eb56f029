"""The training CLI as two real JAX processes on this CPU (jax.distributed, gloo, 4 fake devices each) on the
mesh data=2 x expert=4 gives the same losses as one process with 8 devices: the multi-host code path of
v4jax.train (per-process data blocks, the sharded step, orbax saving from both processes, logs from the
first only). experiments/multihost/two_process_gpu.sh runs the same comparison on a GPU host."""

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cli(workdir) -> list[str]:
    return [sys.executable, "-m", "v4jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
            "--config.mesh.data=2", "--config.mesh.expert=4", f"--config.train.steps={STEPS}",
            "--config.train.log_every=1", f"--config.train.eval_every={STEPS}", "--config.train.eval_batches=2",
            f"--config.train.checkpoint_every={STEPS}", "--config.train.sample_tokens=4",
            "--config.train.progress=False", "--config.optim.warmup_steps=1"]


def env(devices: int, **extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    e.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra)
    return e


def losses(workdir) -> dict[int, float]:
    """Step -> loss from metrics.jsonl, which must hold exactly one record per step (one writer)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"duplicate records: {steps}"
    return {r["step"]: r["loss"] for r in records}


def test_two_process_training_matches_one_process(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    port = str(free_port())
    log_paths = [tmp_path / f"process{i}.log" for i in range(2)]  # files, not pipes: a full pipe would stall
    procs = []
    for i in range(2):
        with open(log_paths[i], "w") as log:
            procs.append(subprocess.Popen(
                cli(multi), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                env=env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                        JAX_PROCESS_ID=str(i))))
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [path.read_text() for path in log_paths]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    one = subprocess.run(cli(single), cwd=ROOT, capture_output=True, text=True, env=env(8), timeout=600)
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]

    got, want = losses(multi), losses(single)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])
    assert "done:" in logs[0] and "done:" in logs[1]  # both processes finish the run
    assert sorted(os.listdir(multi / "checkpoints")) == sorted(os.listdir(single / "checkpoints"))
    assert not (multi / "metrics.jsonl.tmp").exists()
    assert len(os.listdir(multi / "tensorboard")) == 1  # one event file: process 0's
