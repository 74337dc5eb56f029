"""Multi-process start-up: `jax.distributed.initialize()` when the job was launched as several processes.

One process per host (GPU cluster) or per TPU VM worker. JAX auto-detects the coordinator on TPU pods,
under SLURM and under Open MPI; elsewhere the launcher sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
and JAX_PROCESS_ID (see docs/multihost.md). A single process does nothing here.
"""

from __future__ import annotations

import os

import jax

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
