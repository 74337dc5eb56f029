"""experiments/benchmarks/fp4_mosaic_probe.py's sweep parts run end to end on CPU with the kernels in interpret
mode and the device timer stubbed (the probe itself needs a Hopper GPU): rows are written, with no error and
correct results, for a planar dense config with overlapped steps and for grouped decode with packed and window
tiles."""

import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "experiments", "benchmarks"))

import fp4_mosaic_probe as probe


def _interpret(fn):
    return lambda *a, cfg, **kw: fn(*a, cfg=dataclasses.replace(cfg, decode="jnp"), interpret=True,
                                   **{k: v for k, v in kw.items() if k != "a_in_registers"})


def test_probe_parts_write_correct_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(probe.mosaic_gpu, "grouped", _interpret(probe.mosaic_gpu.grouped))
    monkeypatch.setattr(probe.mosaic_gpu, "dense", _interpret(probe.mosaic_gpu.dense))
    monkeypatch.setattr(probe, "timed", lambda fn, args, reps=10: (2.0, 1.0, {}))
    deadline = time.time() + 600
    probe.grouped_part(str(tmp_path), 8, probe.GROUPED_DECODE_WINDOW[:2], deadline, g=8, k=512, n=128, planar=True)
    probe.dense_part(str(tmp_path), 16, 512, probe.DENSE_DECODE_OVERLAP[1:2], 1, deadline, planar=True)
    rows = [json.loads(line) for line in (tmp_path / "fp4_mosaic_probe.jsonl").read_text().splitlines()]
    kernel_rows = [r for r in rows if "cfg" in r]
    assert [r.get("window") for r in kernel_rows if r["part"] == "grouped"] == [False, True]
    assert [r["overlap"] for r in kernel_rows if r["part"] == "dense"] == [True]
    assert len(kernel_rows) == 3 and not [r for r in rows if "error" in r]
    assert all(r["rel_err"] < 1e-2 for r in kernel_rows)
