"""One compact line per row of indexer.py's JSON files (for a device call's short output tail).

Usage: python experiments/benchmarks/indexer_summary.py OUT/indexer.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def fmt(v, nd=3):
    return f"{v:.{nd}g}" if isinstance(v, float) else ("" if v is None else str(v))


def main(paths: list[str]) -> None:
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            print(f"{path}: unreadable ({e})")
            continue
        print(f"{path}: rates {({k: round(v) for k, v in data['rates'].items()})}")
        for r in data["rows"]:
            keys = ("ms", "speedup_vs_xla", "device_ms", "device_speedup_vs_xla", "scores_ms", "select_ms",
                    "quantize_ms", "refine_kernel_ms", "other_ms", "scores_%peak", "recall", "temp_MiB",
                    "refine_ms", "refine_xla_ms", "value_mismatch", "scale_mismatches", "fused_quantize_ms",
                    "xla_quantize_ms")
            cells = " ".join(f"{k}={fmt(r.get(k))}" for k in keys if r.get(k) is not None)
            err = f" ERROR {r['error'][:120]}" if r.get("error") else ""
            print(f"S={r['S']} {r.get('inputs', '')} {r['impl']} q={r['quant']} {r.get('cfg', '')} {cells}{err}")


if __name__ == "__main__":
    main(sys.argv[1:])
