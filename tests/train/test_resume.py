"""kill -9 during training, rerun the same command: it resumes from the last checkpoint and every
loss matches an uninterrupted run with the same seed bitwise (and the two uninterrupted runs agree).
Also: a corrupted newest checkpoint makes the rerun fall back to the previous one and say so."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 6
OVERRIDES = [f"--config.train.steps={STEPS}", "--config.train.batch_size=2", "--config.train.seq_len=32",
             "--config.train.checkpoint_every=2", "--config.train.log_every=1", "--config.train.eval_every=100",
             "--config.train.eval_batches=1", "--config.train.sample_tokens=2", "--config.train.progress=False",
             "--config.optim.warmup_steps=2", "--config.data.max_files=40"]


def command(workdir):
    return [sys.executable, "-m", "v4jax.train", "--config=configs/tiny.py", f"--workdir={workdir}", *OVERRIDES]


def env(cache):
    return dict(os.environ, V4JAX_CACHE=str(cache))


def run_ok(workdir, cache, extra=()):
    """Runs the CLI to completion; on failure the assertion shows the tail of its stderr."""
    result = subprocess.run(command(workdir) + list(extra), cwd=REPO, env=env(cache), capture_output=True,
                            text=True, timeout=1500, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(workdir):
    records = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    by_step = {r["step"]: r["loss"] for r in records}
    assert sorted(by_step) == list(range(1, STEPS + 1)), sorted(by_step)
    assert len(records) == STEPS  # a resumed run does not duplicate records
    return [by_step[s] for s in range(1, STEPS + 1)]


@pytest.mark.slow
def test_kill_and_resume_is_bitwise_identical(tmp_path):
    cache = tmp_path / "cache"  # shared compile cache: reruns start fast
    reference = tmp_path / "reference"
    run_ok(reference, cache)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), cwd=REPO, env=env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 1500
    while not (killed / "checkpoints" / "2").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps_before = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps_before and max(steps_before) < STEPS

    rerun = run_ok(killed, cache)
    assert "resumed from step" in rerun.stdout
    # bitwise: the same floats, compared exactly. Steps before the kill also show that the same seed
    # twice gives the identical curve (two independent processes from scratch).
    assert losses(killed) == losses(reference)

    # corrupt the newest checkpoint of the finished run and ask for 2 more steps: it falls back
    newest = killed / "checkpoints" / str(STEPS)
    for path in (newest / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"xx")
    more = run_ok(killed, cache, [f"--config.train.steps={STEPS + 2}"])
    assert f"checkpoint at step {STEPS} is unreadable; falling back to step {STEPS - 2}" in more.stderr
    assert (killed / "corrupt_checkpoints" / str(STEPS)).is_dir()
