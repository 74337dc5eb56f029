"""GPU time of a jitted call read from a profiler trace: the summed durations of the kernels (and
device-side copies) it launches, per call, in total or by kernel name.

Why not wall-clock time: on the H200 machine the host adds 7 to 15 us per launched op (an XLA read of
8.5 MB took 15.7 us wall, 8.8 us on the device), and an XLA while loop (`lax.map`) adds a host round
trip per iteration; a kernel's efficiency is its device time. Wall time stays the measure of what a
user waits for, and the benchmarks report both.
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile

import jax


def device_events(fn, arg_sets, reps: int = 10) -> dict[str, float] | None:
    """{event name: seconds per call} of the GPU work of fn over arg_sets (each call fn(*a)), from a
    profiler trace after one warm-up pass; None when the trace has no GPU events (CPU, interpret)."""
    from jax.profiler import ProfileData

    for a in arg_sets:
        jax.block_until_ready(fn(*a))
    tmp = tempfile.mkdtemp(prefix="device_trace_")
    with jax.profiler.trace(tmp):
        out = None
        for _ in range(reps):
            for a in arg_sets:
                out = fn(*a)  # earlier outputs are freed once done (no sync between calls)
        jax.block_until_ready(out)
    paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        return None
    by_name: dict[str, float] = collections.defaultdict(float)
    for plane in ProfileData.from_file(paths[0]).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:  # kernels and device-side copies (memcpy / memset count: they are work)
                by_name[ev.name] += ev.duration_ns
    if not by_name:
        return None
    calls = reps * len(arg_sets)
    return {name: ns * 1e-9 / calls for name, ns in by_name.items()}


def device_seconds(fn, arg_sets, reps: int = 10) -> float | None:
    """Seconds of GPU work per call of jax.jit(fn) (all its kernels, launch gaps excluded); None off GPU."""
    events = device_events(jax.jit(fn), arg_sets, reps)
    return sum(events.values()) if events else None


def matching(events: dict[str, float] | None, *needles: str) -> float | None:
    """Seconds per call of the events whose name contains any of `needles` (None without a trace)."""
    if events is None:
        return None
    return sum(t for name, t in events.items() if any(n in name for n in needles))
