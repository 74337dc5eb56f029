"""Metrics sinks: DIR/metrics.jsonl (one JSON object per logged step), TensorBoard events, a progress bar.

TensorBoard events are written with tensorboardX (flax.metrics.tensorboard would pull in
tensorflow). Array-valued metrics (one value per layer) become one scalar per layer in TensorBoard
and lists in the JSON lines; strings (e.g. `routing_source`) go to JSON only.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np


def to_python(value: Any) -> Any:
    """jax/numpy scalars and arrays -> floats / nested lists (JSON-serialisable); others unchanged."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    array = np.asarray(value)
    if array.ndim == 0:
        return array.item()
    return array.tolist()


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drops records with step > last_step (written after the checkpoint a resumed run restarts from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by kill -9
            continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricsWriter:
    """Appends metrics to DIR/metrics.jsonl and DIR/tensorboard/ .

    `primary=False` (every process but the first of a multi-process run, which share the workdir) writes no
    file and keeps its records in `records`, so that one run has one metrics.jsonl and one event file."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, primary: bool = True):
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.primary = primary
        self.records: list[dict[str, Any]] = []
        self._jsonl = open(self.jsonl_path, "a") if primary else None
        self._tb = None
        if tensorboard and primary:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Logs `metrics` at `step`; returns the JSON record written."""
        record = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
        self.records.append(record)
        if self._jsonl is None:
            return record
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in record.items():
                if name == "step" or isinstance(value, str):
                    continue
                if isinstance(value, list):
                    for i, v in enumerate(np.ravel(value)):
                        self._tb.add_scalar(f"{name}/layer{i}", float(v), step)
                elif value is not None:
                    self._tb.add_scalar(name, float(value), step)
        return record

    def write_text(self, step: int, tag: str, text: str) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A tqdm bar over training steps showing loss and tokens/s (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                             dynamic_ncols=True, mininterval=0.5)

    def update(self, n: int, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
