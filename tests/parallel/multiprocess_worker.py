"""One process of the two-process test (test_multiprocess.py): `python multiprocess_worker.py PID N PORT OUT [gpu]`.

CPU (default): each process owns 4 fake CPU devices; `jax.distributed` joins them into one 8-device job (gloo
collectives). `gpu`: each process owns the GPUs CUDA_VISIBLE_DEVICES gives it (NCCL collectives), float32
matmuls at full precision; the launcher is experiments/multihost/two_process_gpu.sh.
It checks, and writes to OUT as JSON:
- data: the pipeline's per-process block (process_index/count from jax) assembled with
  `MeshPlan.put_batch(..., process_local=True)` equals the global batch every process builds whole;
- moe: the routed experts on mesh {expert=8}, which spans both processes, under each CPU dispatch mode,
  against the single-device computation on this process: outputs and gradients (relative L2 errors).
"""

import json
import os
import sys

pid, count, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
on_gpu = sys.argv[5:] == ["gpu"]
if not on_gpu:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
else:  # XLA refuses ragged_all_to_all across processes unless its NCCL send/recv fallback is allowed (H200 x2, session 11)
    os.environ["V4JAX_ALLOW_MULTIPROCESS_RAGGED"] = "1"  # v4jax refuses it there (wrong gradients): re-measure it
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_gpu_allow_ragged_all_to_all_nccl_send_recv_fallback=true").strip()

import jax

if on_gpu:
    jax.config.update("jax_default_matmul_precision", "highest")  # float32 parity, not TF32
else:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=count, process_id=pid)

import functools

import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from v4jax.data import build_pipeline, build_tokenizer, default_data_config, load_corpus
from v4jax.model.moe import clamped_swiglu
from v4jax.parallel import ShardingRules, make_mesh
from v4jax.parallel.expert import local_expert_ffn, routed_experts_parallel
from v4jax.parallel.training import MeshPlan


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


report = {"process_index": jax.process_index(), "process_count": jax.process_count(), "platform": jax.devices()[0].platform,
          "device_kind": jax.devices()[0].device_kind,
          "devices": len(jax.devices()), "local_devices": len(jax.local_devices())}

# ---- data: per-process blocks -> one global array ---------------------------------------------------
cfg = default_data_config()
tok, corpus = build_tokenizer(cfg), load_corpus(cfg)
build = functools.partial(build_pipeline, cfg, tokenizer=tok, split="train", seq_len=32, batch_size=8, seed=1,
                          corpus=corpus)
local_it = build(process_index=jax.process_index(), process_count=jax.process_count())
global_it = build()
n_dev = len(jax.devices())
plan = MeshPlan(make_mesh({"data": count, "expert": n_dev // count}), ShardingRules(), {"params": {}, "buffers": {}})
same, rows = True, []
for _ in range(3):
    local, whole = next(local_it), next(global_it)
    rows.append(local["tokens"].shape[0])
    from_blocks, from_whole = plan.put_batch(local, process_local=True), plan.put_batch(whole)
    for k in whole:
        assembled = multihost_utils.process_allgather(from_blocks[k], tiled=True)
        same &= bool(np.array_equal(assembled, whole[k]))
        same &= bool(np.array_equal(multihost_utils.process_allgather(from_whole[k], tiled=True), whole[k]))
report["data"] = {"blocks_assemble_the_global_batch": same, "local_rows": rows, "rows": [local_it.rows.start,
                                                                                        local_it.rows.stop]}

# ---- MoE across processes ---------------------------------------------------------------------------
T, d, I, E, K = 64, 16, 8, 8, 2
rng = np.random.default_rng(0)  # the same on every process
x = rng.normal(size=(T, d)).astype(np.float32)
w1, w3 = (rng.normal(size=(E, d, I)).astype(np.float32) for _ in range(2))
w2 = rng.normal(size=(E, I, d)).astype(np.float32)
idx = np.argsort(-(rng.normal(size=(T, E)) + np.linspace(0, 3, E)), axis=1)[:, :K].astype(np.int32)
wt = rng.uniform(0.1, 1.0, size=(T, K)).astype(np.float32)
cot = rng.normal(size=(T, d)).astype(np.float32)
act = functools.partial(clamped_swiglu, limit=10.0)


def loss(fn, idx, x, wt, w1, w3, w2):
    y = fn(x, idx, wt, w1, w3, w2)  # [T, d]
    return jnp.sum(y * cot), y


def grads_of(fn):
    return jax.jit(jax.value_and_grad(functools.partial(loss, fn), argnums=(1, 2, 3), has_aux=True))


with jax.default_device(jax.local_devices()[0]):  # the single-device reference, on this process alone
    (_, y_ref), g_ref = grads_of(functools.partial(local_expert_ffn, first_expert=0, activation=act))(
        idx, x, wt, w1, w3, w2)

mesh = make_mesh({"expert": n_dev})  # spans both processes: the dispatch crosses hosts
tok_s = w_s = NamedSharding(mesh, P("expert"))


def put(a, s):
    return jax.make_array_from_process_local_data(s, a, a.shape)  # every process holds the whole array


def gather(a):
    return multihost_utils.process_allgather(a, tiled=True)


report["moe"] = {}
for mode in ("all_gather", "all_to_all") + (("ragged_all_to_all",) if on_gpu else ()):
    fn = functools.partial(routed_experts_parallel, activation=act, rules=ShardingRules(), mesh=mesh, dispatch=mode)
    try:  # a mode the runtime refuses is reported, and the other modes still run
        (_, y), g = grads_of(fn)(put(idx, tok_s), put(x, tok_s), put(wt, tok_s), put(w1, w_s), put(w3, w_s),
                                put(w2, w_s))
        report["moe"][mode] = {"y": rel(gather(y), y_ref), "grad_x": rel(gather(g[0]), g_ref[0]),
                               "grad_weights": rel(gather(g[1]), g_ref[1]), "grad_w1": rel(gather(g[2]), g_ref[2])}
    except Exception as err:  # noqa: BLE001
        report["moe"][mode] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}

with open(out_path, "w") as f:
    json.dump(report, f)
jax.distributed.shutdown()
