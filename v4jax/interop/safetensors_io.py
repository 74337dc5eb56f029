"""Memory-mapped safetensors reading and writing, for every dtype real DeepSeek-V4 checkpoints use.

We parse the (simple) safetensors header ourselves instead of using `safetensors.safe_open` because the
upstream checkpoints carry dtypes the numpy frontend does not map (`F8_E4M3`, `F8_E8M0`, packed `F4`),
and because a memory map lets the loader read one tensor at a time with no second copy of the file.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np

from v4jax.interop.hf_config import CheckpointError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}
PACKED_F4 = "F4"  # float4_e2m1fn_x2: logical shape [.., n], two values per byte, element 2i in the low nibble


class TensorRef:
    """One tensor of a safetensors file, read on demand through a memory map."""

    def __init__(self, path: str, name: str, dtype: str, shape: list[int], start: int, end: int):
        self.path, self.name, self.dtype, self.shape, self.start, self.end = path, name, dtype, shape, start, end

    def read(self) -> np.ndarray:
        """The stored values; `F4` comes back as packed uint8 [.., n/2] (element 2i in the low nibble)."""
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.start, shape=(self.end - self.start,))
        if self.dtype == PACKED_F4:
            shape = [*self.shape[:-1], self.shape[-1] // 2]
            return np.asarray(mm).reshape(shape)
        if self.dtype not in DTYPES:
            raise CheckpointError(f"{os.path.basename(self.path)}: tensor {self.name} has unknown dtype {self.dtype}")
        return np.asarray(mm.view(DTYPES[self.dtype])).reshape(self.shape)


def read_header(path: str) -> dict[str, TensorRef]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    size = os.path.getsize(path)
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if 8 + n + end > size:
            raise CheckpointError(f"{path}: tensor {name} extends past the end of the file (truncated download?)")
        refs[name] = TensorRef(path, name, info["dtype"], list(info["shape"]), 8 + n + start, 8 + n + end)
    return refs


def open_checkpoint(checkpoint_dir: str) -> dict[str, TensorRef]:
    """All tensors of a checkpoint directory: `model.safetensors`, or the shards listed in the index json."""
    index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [p for p in files if not os.path.isfile(os.path.join(checkpoint_dir, p))]
        if missing:
            raise CheckpointError(f"{index}: lists shard {missing[0]} which does not exist")
    else:
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(checkpoint_dir, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{checkpoint_dir}: no *.safetensors files")
    refs: dict[str, TensorRef] = {}
    for fname in files:
        refs.update(read_header(os.path.join(checkpoint_dir, fname)))
    return refs


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes numpy arrays (any dtype of DTYPES) atomically (a temp file renamed into place)."""
    names = {np.dtype(v): k for k, v in DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        blob = arr.tobytes()
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)
