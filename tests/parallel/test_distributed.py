"""When `jax.distributed.initialize()` is called (only for a job launched as several processes), and how
multi-process runs align the processes after compiling each step (`compile_in_step`)."""

import jax
import numpy as np
import pytest

from v4jax.parallel import distributed

ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
       "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def clean_env(monkeypatch):
    for key in ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(distributed, "_initialized", False)
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return monkeypatch, calls


def test_single_process_does_nothing(clean_env):
    monkeypatch, calls = clean_env
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    assert distributed.maybe_initialize_distributed() is False and calls == []


@pytest.mark.parametrize("env, kwargs", [
    ({"SLURM_NTASKS": "4"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {}),
    ({"JAX_COORDINATOR_ADDRESS": "host0:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     {"coordinator_address": "host0:1234", "num_processes": 2, "process_id": 1}),
])
def test_several_processes_initialize_once(clean_env, env, kwargs):
    monkeypatch, calls = clean_env
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.maybe_initialize_distributed() is True
    assert distributed.maybe_initialize_distributed() is True
    assert calls == [kwargs]


def test_process_row_range():
    """The rows one process's devices hold: one block, or a one-line error when they interleave with another's."""
    from v4jax.parallel.training import process_row_range

    block = [(slice(4, 6), slice(None)), (slice(6, 8), slice(None)), (slice(4, 6), slice(None))]  # + a replica
    assert process_row_range(block, 8) == (4, 8)
    assert process_row_range([(slice(None), slice(None))], 8) == (0, 8)  # replicated over the batch
    with pytest.raises(ValueError, match=r"^put_batch: this process's devices hold rows \[0, 1, 4, 5\] .*$"):
        process_row_range([(slice(0, 2),), (slice(4, 6),)], 8)


class _FakeJit:
    """Stands in for a jax.jit function: counts ahead-of-time compiles and calls."""

    def __init__(self):
        self.compiles, self.calls = [], 0

    def lower(self, *args, **kwargs):
        outer = self

        class _Lowered:
            def compile(self):
                outer.compiles.append(args)

        return _Lowered()

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return sum(np.sum(a) for a in args)


def test_compile_in_step_aligns_processes_once_per_signature(monkeypatch):
    barriers = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "wait_for_all_processes", barriers.append)
    fake = _FakeJit()
    step = distributed.compile_in_step(fake, "train_step")
    a, b = np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)
    step(a, 1)
    step(a, 2)  # same signature: Python ints trace like arrays, no new compile
    step(b, 1)  # new shape: compiles, then waits again
    step(a.astype(np.int32), 1)  # new dtype
    assert len(fake.compiles) == 3 and fake.calls == 4
    assert barriers == ["v4jax_compiled_train_step_0", "v4jax_compiled_train_step_1",
                        "v4jax_compiled_train_step_2"]


def test_compile_in_step_is_a_plain_call_in_one_process():
    fake = _FakeJit()
    step = distributed.compile_in_step(fake, "eval_step")
    assert step(np.ones(3)) == 3 and fake.compiles == [] and fake.calls == 1
