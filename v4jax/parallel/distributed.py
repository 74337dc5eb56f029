"""Multi-process start-up: `jax.distributed.initialize()` when the job was launched as several processes.

One process per host (GPU cluster) or per TPU VM worker. JAX auto-detects the coordinator on TPU pods,
under SLURM and under Open MPI; elsewhere the launcher sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
and JAX_PROCESS_ID (see docs/multihost.md). A single process does nothing here.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax._src.distributed
import numpy as np

# Environment variables whose presence means "this is one process of several".
_MULTI_PROCESS_HINTS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _launched_as_several() -> bool:
    if any(os.environ.get(k) for k in _MULTI_PROCESS_HINTS):
        return True
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"):
        if int(os.environ.get(key, "1") or "1") > 1:
            return True
    workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")  # set on every VM of a multi-host TPU slice
    return "," in workers


_initialized = False


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` once when launched as several processes; returns whether it did.

    Must run before anything touches the devices (the CLI calls it first thing).
    """
    global _initialized
    if _initialized or not _launched_as_several():
        return _initialized
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
    if os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    # CPU processes need a cross-process collectives backend (XLA:CPU has none by default); this setting
    # changes nothing on GPU/TPU, where NCCL / ICI carry the collectives
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    _initialized = True
    return True


def wait_for_all_processes(name: str, timeout_s: float = 1800.0) -> None:
    """Blocks until every process reaches the barrier `name` (the coordination service's, not a device
    collective, so it works before any collective exists); nothing in a single process."""
    client = jax._src.distributed.global_state.client
    if jax.process_count() > 1 and client is not None:
        client.wait_at_barrier(name, int(timeout_s * 1000))


def signature(args: Any) -> Any:
    """A hashable key of a call's arguments: tree structure, and per leaf shape, dtype and sharding (or the
    value itself for non-arrays), i.e. what decides whether jit compiles anew."""
    leaves, tree = jax.tree_util.tree_flatten(args)

    def leaf(x):
        if hasattr(x, "shape"):
            return np.shape(x), str(getattr(x, "dtype", type(x))), getattr(x, "sharding", None)
        return type(x) if isinstance(x, (bool, int, float, complex)) else x  # traced like arrays by jit

    return tree, tuple(leaf(x) for x in leaves)


def compile_in_step(jitted: Callable, name: str) -> Callable:
    """`jitted` (a jax.jit function) whose first call with each argument signature, in a multi-process
    run, compiles ahead of time and then waits for every process before executing.

    Why: on CPU the cross-process collectives (gloo) create each communicator at the first execution,
    with a fixed 30 s rendezvous. On a loaded machine one process can finish compiling a train step more
    than 30 s after another, and the early one then fails with "Gloo context initialization failed:
    DEADLINE_EXCEEDED" (seen in tests/parallel/test_multiprocess_training.py). Aligning the processes
    after compilation removes the skew; later calls hit jit's cache and run as before.
    """
    seen: set = set()

    @functools.wraps(jitted)
    def call(*args, **kwargs):
        if jax.process_count() > 1:
            key = signature((args, kwargs))
            if key not in seen:
                jitted.lower(*args, **kwargs).compile()  # fills jit's compilation cache
                wait_for_all_processes(f"v4jax_compiled_{name}_{len(seen)}")
                seen.add(key)
        return jitted(*args, **kwargs)

    return call
