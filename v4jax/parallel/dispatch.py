"""All-to-all dispatch and combine for the routed experts (inside `jax.shard_map`), dropless.

Three dispatch modes exist (`config.mesh.moe_dispatch`, checked by `check_dispatch`):

- "all_gather" (`expert.py`): every expert shard all-gathers the tokens of its expert group and
  `psum_scatter`s the outputs back. Moves (n-1) T token rows in and out per shard (n = size of the
  `expert` axis, T = local tokens), whatever the routing.
- "all_to_all" (here): each shard sorts its T*K token-expert pairs by destination shard and exchanges
  them with `jax.lax.all_to_all` in a dense [n, C, d] buffer. Dropless means C is the worst case, all T*K
  pairs of a shard going to one destination, so the send and receive buffers hold n*T*K rows each (K
  times the all-gathered tokens; mostly zeros under balanced routing) and the all_to_all moves them all.
  It runs on XLA:CPU and exists to test the exchange metadata there and as a fallback; it is never the
  cheaper choice in bytes.
- "ragged_all_to_all" (here): the same send/receive metadata, but `jax.lax.ragged_all_to_all` moves only
  the real rows (T*K per shard and direction, (n-1)/n of them leaving the shard under balanced routing).
  The receive buffer still has the worst-case n*T*K rows (dropless), so it saves bandwidth, not memory.
  XLA:CPU does not implement it (jax #34755): asking for it on CPU is a one-line ValueError, not a
  silent fallback, so a CPU run never reports "ragged" numbers that came from another collective.

"auto" (the default) resolves to "all_gather" on every platform for now: it is the one mode whose
parity has been shown end to end. On two H200s in two processes (session 11, the multi-process worker,
XLA's NCCL send/recv fallback allowed) "all_gather" and "all_to_all" matched one device (0 and <= 1.4e-7),
and "ragged_all_to_all" gave the right outputs (8.7e-8) but wrong gradients (input 1.05, expert weights
1.0 relative error): `resolve_dispatch` refuses it where an expert group spans GPU processes.
Single-process multi-GPU runs of it are still unmeasured (the tiny model's GPU compile outlasted that
call). By byte count "ragged_all_to_all" should win on GPU/TPU when K < n (T*K*(n-1)/n vs T*(n-1) rows
each way, balanced routing): ask for it explicitly, and once
`python -m v4jax.parallel.bench --parity --scaling --dispatch ...` has shown its parity on real GPUs,
make it auto's choice there.

The exchange metadata ([n] int32 per shard unless noted; three all_to_alls of a few integers):
  send_counts[j, e]  pairs this shard sends to local expert e of shard j ([n, E_loc]; its pairs are
                     sorted by destination, then by expert)
  send_sizes[j]      pairs this shard sends to shard j                  = send_counts.sum(1)
  input_offsets[j]   where those pairs start in this shard's sorted pairs (exclusive cumsum)
  recv_counts[s, e]  pairs shard s sends to my expert e                  = all_to_all(send_counts)
  recv_sizes[s]      pairs shard s sends here                            = recv_counts.sum(1)
  recv_offsets[s]    where they land in the compact (ragged) receive buffer (exclusive cumsum)
  output_offsets[j]  where this shard's pairs land on shard j          = all_to_all(recv_offsets)
  source_offsets[s]  where shard s keeps the pairs it sent here        = all_to_all(input_offsets)
The receiver knows the expert of every received row from recv_counts (each source's rows come sorted
by expert), so only the token rows travel, never per-row expert ids.
The results go back along the same routes reversed, and each shard combines them with its own routing
weights (a token's K results times its K weights, summed), so the weights' gradients stay local.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from v4jax.kernels.grouped_matmul import grouped_matmul

DISPATCH_MODES = ("auto", "all_gather", "all_to_all", "ragged_all_to_all")
# Lets ragged_all_to_all run where an expert group spans GPU processes (resolve_dispatch refuses it there: wrong
# gradients, session 11); tests/parallel/multiprocess_worker.py sets it to re-measure
ALLOW_MULTIPROCESS_RAGGED = "V4JAX_ALLOW_MULTIPROCESS_RAGGED"

# The mode in force while tracing. A jit-cache-sensitive context (jax.make_user_context), so a function
# traced under one mode is re-traced under another instead of silently reusing the first trace.
_DISPATCH = jax.make_user_context("auto")


def check_dispatch(mode: str, field: str = "config.mesh.moe_dispatch") -> str:
    """`mode` if it is a known dispatch mode, else a one-line ValueError naming `field`."""
    if not isinstance(mode, str) or mode not in DISPATCH_MODES:
        raise ValueError(f"{field}: must be one of {', '.join(DISPATCH_MODES)}, got {mode!r}")
    return mode


@contextlib.contextmanager
def moe_dispatch(mode: str):
    """Sets the MoE dispatch mode for the functions traced inside (MeshPlan.under_mesh enters it)."""
    with _DISPATCH(check_dispatch(mode)):
        yield


def current_dispatch() -> str:
    return _DISPATCH.value


def resolve_dispatch(mode: str, platform: str, n_expert: int, top_k: int, spans_processes: bool = False) -> str:
    """The concrete mode for `mode` ("auto" resolved, see the module docstring); refuses ragged on CPU, and on
    GPUs when an expert group spans processes (`spans_processes`)."""
    check_dispatch(mode)
    if mode == "auto":  # all_gather until the ragged path has run on real GPUs (module docstring)
        del n_expert, top_k
        return "all_gather"
    if mode == "ragged_all_to_all" and platform == "cpu":
        raise ValueError("moe_dispatch='ragged_all_to_all': ragged_all_to_all is not implemented on XLA:CPU "
                         "(jax #34755); use 'all_to_all' or 'all_gather' on CPU")
    if (mode == "ragged_all_to_all" and platform == "gpu" and spans_processes
            and os.environ.get(ALLOW_MULTIPROCESS_RAGGED) != "1"):
        raise ValueError("moe_dispatch='ragged_all_to_all': across GPU processes its gradients came out wrong "
                         "(H200 x2: forward 8.7e-8, input gradient 1.05 relative error); use 'all_to_all' or "
                         f"'all_gather' ({ALLOW_MULTIPROCESS_RAGGED}=1 lifts this, to re-measure)")
    return mode


@dataclasses.dataclass(frozen=True)
class Routes:
    """The exchange metadata of one shard (see the module docstring); int32 [n], the counts [n, E_loc]."""

    recv_counts: Array
    send_sizes: Array
    input_offsets: Array
    recv_sizes: Array
    recv_offsets: Array
    output_offsets: Array
    source_offsets: Array


def _exclusive_cumsum(x: Int[Array, " n"]) -> Int[Array, " n"]:
    return jnp.cumsum(x) - x


def exchange_routes(send_counts: Int[Array, "n e"], axis: str) -> Routes:
    """All the sizes and offsets from this shard's per-(destination, local expert) pair counts, with three
    all_to_alls of n * E_loc, n and n integers."""
    a2a = lambda v: jax.lax.all_to_all(v, axis, 0, 0, tiled=True)  # [n, ...] -> [n, ...]
    send_counts = send_counts.astype(jnp.int32)
    send_sizes = jnp.sum(send_counts, axis=1)  # [n]
    input_offsets = _exclusive_cumsum(send_sizes)
    recv_counts = a2a(send_counts)  # [n, E_loc]: row s = what shard s sends to each of my experts
    recv_sizes = jnp.sum(recv_counts, axis=1)  # [n]
    recv_offsets = _exclusive_cumsum(recv_sizes)
    return Routes(recv_counts, send_sizes, input_offsets, recv_sizes, recv_offsets, a2a(recv_offsets),
                  a2a(input_offsets))


def received_experts(routes: Routes, capacity: int, dense: bool) -> Int[Array, " r"]:
    """The local expert of every row of the receive buffer [n * capacity] (E_loc on padding rows).

    Dense layout: row s*capacity + c is rank c of source s. Compact (ragged) layout: the sources' rows
    follow each other from row 0. Either way each source's rows come sorted by expert.
    """
    n, E_loc = routes.recv_counts.shape
    if dense:
        ends = jnp.cumsum(routes.recv_counts, axis=1)  # [n, E_loc] end of each expert's rows per source
        c = jnp.arange(capacity, dtype=jnp.int32)
        e = jax.vmap(lambda ends_s: jnp.searchsorted(ends_s, c, side="right"))(ends)  # [n, C] in [0, E_loc]
        return e.reshape(-1).astype(jnp.int32)
    ends = jnp.cumsum(routes.recv_counts.reshape(-1))  # [n*E_loc] segment ends, source-major
    seg = jnp.searchsorted(ends, jnp.arange(n * capacity, dtype=jnp.int32), side="right")  # [n*C]
    return jnp.where(seg < n * E_loc, seg % E_loc, E_loc).astype(jnp.int32)


# ---- the two exchanges: rows sorted by destination -> receive buffer, and back ----------------------

def _dense_slots(routes: Routes, dest: Int[Array, " p"], capacity: int) -> Int[Array, " p"]:
    """Row of each sorted pair in the dense [n * capacity] send buffer: its destination's block + rank."""
    rank = jnp.arange(dest.shape[0], dtype=jnp.int32) - routes.input_offsets[dest]  # [P] rank within block
    return dest * capacity + rank


def dense_forward(rows: Array, fill, routes: Routes, dest: Int[Array, " p"], axis: str) -> Array:
    """Sorted pairs `rows` [P, ...] -> the receive buffer [n * P, ...] (block s from shard s, zero/`fill` padded)."""
    n, P = routes.send_sizes.shape[0], rows.shape[0]
    send = jnp.full((n * P, *rows.shape[1:]), fill, rows.dtype).at[_dense_slots(routes, dest, P)].set(rows)
    return jax.lax.all_to_all(send, axis, 0, 0, tiled=True)  # [n * P, ...]


def dense_backward(results: Array, routes: Routes, dest: Int[Array, " p"], axis: str) -> Array:
    """Receive-buffer results [n * P, d] -> this shard's sorted pairs [P, d] (the forward route reversed)."""
    P = results.shape[0] // routes.send_sizes.shape[0]
    back = jax.lax.all_to_all(results, axis, 0, 0, tiled=True)  # [n * P, d]: block j from shard j
    return back[_dense_slots(routes, dest, P)]  # [P, d]


RaggedCollective = Callable[..., Array]  # the signature of jax.lax.ragged_all_to_all


def ragged_forward(rows: Array, fill, routes: Routes, axis: str,
                   collective: RaggedCollective = jax.lax.ragged_all_to_all) -> Array:
    """Sorted pairs [P, ...] -> the compact receive buffer [n * P, ...] (source s at recv_offsets[s])."""
    n, P = routes.send_sizes.shape[0], rows.shape[0]
    out = jnp.full((n * P, *rows.shape[1:]), fill, rows.dtype)
    return collective(rows, out, routes.input_offsets, routes.send_sizes, routes.output_offsets,
                      routes.recv_sizes, axis_name=axis)


def ragged_backward(results: Array, routes: Routes, axis: str,
                    collective: RaggedCollective = jax.lax.ragged_all_to_all) -> Array:
    """Compact receive-buffer results [n * P, d] -> this shard's sorted pairs [P, d]."""
    P = results.shape[0] // routes.send_sizes.shape[0]
    out = jnp.zeros((P, *results.shape[1:]), results.dtype)
    return collective(results, out, routes.recv_offsets, routes.recv_sizes, routes.source_offsets,
                      routes.send_sizes, axis_name=axis)


def emulated_ragged_all_to_all(operand: Array, output: Array, input_offsets: Int[Array, " n"],
                               send_sizes: Int[Array, " n"], output_offsets: Int[Array, " n"],
                               recv_sizes: Int[Array, " n"], *, axis_name: str) -> Array:
    """`jax.lax.ragged_all_to_all`'s documented semantics (one slice per peer) from a dense all_to_all.

    For tests on XLA:CPU only: it moves operand.shape[0] rows to every peer. It lets the ragged path's
    metadata be checked on fake CPU devices; the real collective is only exercised on GPU/TPU.
    """
    n, N = input_offsets.shape[0], operand.shape[0]
    r = jnp.arange(N, dtype=jnp.int32)
    src = input_offsets[:, None] + r[None, :]  # [n, N] operand rows of the slice for each peer
    keep = r[None, :] < send_sizes[:, None]  # [n, N]
    chunks = jnp.where(keep.reshape(n, N, *([1] * (operand.ndim - 1))), operand[jnp.clip(src, 0, N - 1)], 0)
    got = jax.lax.all_to_all(chunks.reshape(n * N, *operand.shape[1:]), axis_name, 0, 0, tiled=True)
    where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # [n] my offset of each source
    dst = where[:, None] + r[None, :]  # [n, N]
    dst = jnp.where(r[None, :] < recv_sizes[:, None], dst, output.shape[0])  # padding rows: out of bounds
    return output.at[dst.reshape(-1)].set(got, mode="drop")


# ---- the expert computation on one shard ----------------------------------------------------------

def a2a_expert_ffn(x: Float[Array, "t d"], idx: Int[Array, "t k"], weights: Float[Array, "t k"],
                   w1: Float[Array, "e d i"], w3: Float[Array, "e d i"], w2: Float[Array, "e i d"],
                   activation: Callable, axis: str, mode: str,
                   ragged_collective: RaggedCollective = jax.lax.ragged_all_to_all) -> Float[Array, "t d"]:
    """One expert shard's routed-expert output for its own T tokens, float32 [T, d] (partial over `tensor`).

    Runs inside `jax.shard_map` over the `expert` axis `axis` (w1/w3/w2 hold this shard's E_loc experts,
    contiguous: shard j owns experts [j E_loc, (j+1) E_loc)). `mode` is "all_to_all" or "ragged_all_to_all".
    """
    if mode not in ("all_to_all", "ragged_all_to_all"):
        raise ValueError(f"a2a_expert_ffn: mode must be 'all_to_all' or 'ragged_all_to_all', got {mode!r}")
    K = idx.shape[1]
    E_loc = w1.shape[0]
    flat = idx.reshape(-1)  # [P] global expert of each pair, P = T*K
    order = jnp.argsort(flat, stable=True)  # by destination shard, then by its local expert
    token_of = order // K  # [P]
    dest = (flat // E_loc)[order].astype(jnp.int32)  # [P] destination shard of each sorted pair
    n = jax.lax.axis_size(axis)
    routes = exchange_routes(jnp.bincount(flat, length=n * E_loc).reshape(n, E_loc), axis)
    xs = x[token_of]  # [P, d] sorted by destination

    if mode == "all_to_all":
        xr = dense_forward(xs, 0, routes, dest, axis)  # [n*P, d]
    else:
        xr = ragged_forward(xs, 0, routes, axis, ragged_collective)  # [n*P, d]
    er = received_experts(routes, flat.shape[0], dense=mode == "all_to_all")  # [n*P] local expert, E_loc: padding

    # the received rows sorted by local expert; padding (key E_loc) sorts last, into no group
    o2 = jnp.argsort(er, stable=True)  # [n*P]
    group_sizes = jnp.bincount(er, length=E_loc + 1)[:E_loc]  # [E_loc]
    xe = xr[o2]  # [n*P, d]
    gate = grouped_matmul(xe, w1, group_sizes)  # [n*P, I]
    up = grouped_matmul(xe, w3, group_sizes)  # [n*P, I]
    ye = grouped_matmul(activation(gate, up), w2, group_sizes)  # [n*P, d]; rows past the groups are 0
    inverse = jnp.zeros_like(o2).at[o2].set(jnp.arange(o2.shape[0], dtype=o2.dtype))  # [n*P]
    yr = ye[inverse]  # [n*P, d] back in receive-buffer order

    if mode == "all_to_all":
        ys = dense_backward(yr, routes, dest, axis)  # [P, d]
    else:
        ys = ragged_backward(yr, routes, axis, ragged_collective)  # [P, d]
    wts = weights.reshape(-1)[order][:, None]  # [P, 1] routing weight of each sorted pair
    contrib = ys.astype(jnp.float32) * wts.astype(jnp.float32)  # [P, d]
    return jnp.zeros(x.shape, jnp.float32).at[token_of].add(contrib)  # [T, d]
