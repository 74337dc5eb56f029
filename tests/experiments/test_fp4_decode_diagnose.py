"""experiments/benchmarks/fp4_decode_diagnose.py runs end to end in its CPU smoke mode (interpret mode, tiny
shapes): every stage gives a row, the load/decode probes compile, and the kernel rows are correct."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_smoke(tmp_path):
    script = os.path.join(ROOT, "experiments", "benchmarks", "fp4_decode_diagnose.py")
    run = subprocess.run([sys.executable, script, "--smoke", "--no-mosaic", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "fp4_decode_diagnose.json").read_text())["rows"]
    stages = [r["stage"] for r in rows]
    for stage in ("copy", "read", "as_words", "load", "decode", "kernel", "full", "xla_bf16"):
        assert stage in stages, stage
    assert not [r for r in rows if "error" in r]
    assert all(r["rel_err"] < 1e-2 for r in rows if r["stage"] == "kernel")
