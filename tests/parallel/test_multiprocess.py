"""Two real JAX processes on this CPU (jax.distributed, gloo collectives, 4 fake devices each): the data
pipeline's per-process blocks assemble the global batch, and the expert-parallel MoE whose `expert` axis
spans both processes equals the single-device one (outputs and gradients) under all_gather and all_to_all.
See multiprocess_worker.py for what each process does."""

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes(tmp_path):
    port, count = str(free_port()), 2
    outs = [tmp_path / f"process{i}.json" for i in range(count)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(count), port, str(outs[i])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(count)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    reports = [json.loads(o.read_text()) for o in outs]
    for i, r in enumerate(reports):
        assert (r["process_index"], r["process_count"], r["devices"], r["local_devices"]) == (i, 2, 8, 4)
        assert r["data"]["blocks_assemble_the_global_batch"]
        assert r["data"]["local_rows"] == [4, 4, 4] and r["data"]["rows"] == [4 * i, 4 * i + 4]
        for mode in ("all_gather", "all_to_all"):
            assert "error" not in r["moe"][mode], (i, mode, r["moe"][mode])
            for name, err in r["moe"][mode].items():
                assert err < 1e-5, (i, mode, name, err)
