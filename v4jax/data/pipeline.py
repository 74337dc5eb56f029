"""The grain pipeline: documents -> tokens (+EOS) -> packed rows of seq_len -> batches.

Stages (all grain, so the state of the whole chain is grain's own checkpointable state):

    MapDataset.source(document indices of the split)
      EpochShuffleMapDataset    train only, global, reshuffled every epoch (no buffer; see shuffle.py)
      .repeat(num_epochs)       None = forever
      .map(tokenize + EOS)      {"tokens": int32 [n]}
    .to_iter_dataset()
    ConcatThenSplitIterDataset  concatenates documents and cuts rows of seq_len; a document that
                                does not fit is split and its remainder starts the next row as a
                                new segment (positions restart at 0); no padding except at the end
      .map(next-token targets)  targets / loss_mask never cross a segment boundary
    WindowShuffleIterDataset    train only, when shuffle and shuffle_buffer > 0 (see shuffle.py)
      .batch(batch_size)        a final partial batch (finite epochs) is padded with empty rows
      .map(process rows)        several processes: this process's block of rows of the global batch
      .mp_prefetch(...)         only when num_workers > 0

Several processes (multi-host): every process runs the same seeded chain, so the global batch (and the
iterator state) is the same everywhere, and keeps only its block of `batch_size // process_count` rows,
`process_rows(batch_size, process_index, process_count)`; the training loop assembles the global array
from the blocks with `jax.make_array_from_process_local_data` (`MeshPlan.put_batch(..., process_local=True)`).
The global batch does not depend on the number of processes (a run resumes on another host count with
the same data), at the price that every host tokenizes and packs every row; sharding the documents per
process would remove that cost but make the stream depend on the process count.

The returned `DataIterator` yields dicts of numpy arrays and has `get_state()` (a JSON-serialisable
dict) and `set_state(state)`: the training loop stores the state in its orbax checkpoint as JSON
(`ocp.args.JsonSave(it.get_state())`, restored with `ocp.args.JsonRestore()`), so one checkpoint
holds the model and the data position together. We do not use grain's orbax handler
(`grain.checkpoint.CheckpointSave`) because it wants the grain iterator itself, while JSON also
carries our pipeline fingerprint that refuses a state saved by a different pipeline.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import Any, Self

import grain
import ml_collections
import numpy as np
from absl import flags as absl_flags
from jaxtyping import Float, Int

from v4jax.data.config import validate_data_config
from v4jax.data.corpus import Corpus, load_corpus, split_indices
from v4jax.data.shuffle import EpochShuffleMapDataset, WindowShuffleIterDataset
from v4jax.data.tokenizer import Tokenizer

STATE_VERSION = 1


def next_token_targets(
    tokens: Int[np.ndarray, " S"], segment_ids: Int[np.ndarray, " S"]
) -> tuple[Int[np.ndarray, " S"], Float[np.ndarray, " S"]]:
    """targets[t] = tokens[t+1] where t+1 is in the same (non-padding) segment, else 0 (masked).

    The last position of a row has no next token in the row, so it is always masked.
    """
    same = (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[:-1] > 0)  # [S-1]
    targets = np.zeros_like(tokens)
    targets[:-1] = np.where(same, tokens[1:], 0)
    loss_mask = np.zeros(tokens.shape, dtype=np.float32)
    loss_mask[:-1] = same
    return targets, loss_mask


def _make_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tokens = packed["tokens"].astype(np.int32)
    segment_ids = packed["tokens_segment_ids"].astype(np.int32)
    positions = np.where(segment_ids > 0, packed["tokens_positions"], 0).astype(
        np.int32
    )
    targets, loss_mask = next_token_targets(tokens, segment_ids)
    return {
        "tokens": tokens,
        "segment_ids": segment_ids,
        "positions": positions,
        "targets": targets,
        "loss_mask": loss_mask,
    }


class _Tokenize(grain.transforms.Map):
    """Document index -> {"tokens": int32 [n]} with EOS appended when `eos_id >= 0`."""

    def __init__(self, corpus: Corpus, tokenizer: Tokenizer, eos_id: int):
        self._corpus = corpus
        self._tokenizer = tokenizer
        self._eos = np.array([eos_id], dtype=np.int32) if eos_id >= 0 else None

    def map(self, index):
        ids = self._tokenizer.encode_bytes(self._corpus.document(int(index)))
        if self._eos is not None:
            ids = np.concatenate([ids, self._eos])
        return {"tokens": ids}


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of a global batch of `batch_size` that process `process_index` of `process_count` keeps."""
    ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (process_index, process_count))
    if not ints or process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"build_pipeline: process_index {process_index} is not in [0, process_count "
                         f"{process_count})")
    if batch_size % process_count:
        raise ValueError(f"build_pipeline: batch_size {batch_size} does not split over {process_count} processes")
    rows = batch_size // process_count
    return slice(process_index * rows, (process_index + 1) * rows)


class _ProcessRows(grain.transforms.Map):
    """Global batch -> this process's block of rows (a copy, so the global batch can be freed)."""

    def __init__(self, rows: slice):
        self._rows = rows

    def map(self, batch):
        return {k: np.ascontiguousarray(v[self._rows]) for k, v in batch.items()}


class _PadBatch(grain.transforms.Map):
    """Pads a final partial batch with empty rows (segment 0, loss_mask 0) to `batch_size`."""

    def __init__(self, batch_size: int):
        self._batch_size = batch_size

    def map(self, batch):
        missing = self._batch_size - batch["tokens"].shape[0]
        if missing == 0:
            return batch
        return {
            k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
            for k, v in batch.items()
        }


def _restore_tuples(state: Any) -> Any:
    """Undoes JSON's tuple -> list: grain's packer compares its slices to the tuple (-1, -1)."""
    if isinstance(state, dict):
        return {
            k: (
                {f: tuple(s) for f, s in v.items()}
                if k == "remainder_slices"
                else _restore_tuples(v)
            )
            for k, v in state.items()
        }
    if isinstance(state, list):
        return [_restore_tuples(v) for v in state]
    return state


class DataIterator:
    """Iterator of batches with a JSON-serialisable, exactly restorable state."""

    def __init__(self, dataset: grain.IterDataset, fingerprint: str, num_docs: int,
                 rows: slice | None = None, global_batch_size: int | None = None):
        self._iterator = iter(dataset)
        self.fingerprint = fingerprint
        self.num_docs = num_docs  # documents in this split (one epoch)
        self.rows = rows  # the rows of the global batch this process yields (all of them: one process)
        self.global_batch_size = global_batch_size

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def close(self) -> None:
        """Stops grain worker processes (num_workers > 0); call it when done with the iterator."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_state(self) -> dict[str, Any]:
        """The position in the stream: plain JSON types only (dicts, lists, str, int)."""
        grain_state = json.loads(json.dumps(self._iterator.get_state()))
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "grain": grain_state,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a state from `get_state` (possibly JSON round-tripped) of the same pipeline."""
        if (
            not isinstance(state, dict)
            or state.get("version") != STATE_VERSION
            or "grain" not in state
        ):
            raise ValueError(
                f"data state: not a v4jax data state (version {STATE_VERSION}): keys {list(state)}"
            )
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                "data state: saved by a different pipeline (data config, split, seq_len, batch_size, seed "
                "or corpus changed); start the data from scratch or restore the original config"
            )
        self._iterator.set_state(_restore_tuples(state["grain"]))


def _fingerprint(
    cfg: ml_collections.ConfigDict, corpus: Corpus, tokenizer: Tokenizer, **kwargs: Any
) -> str:
    what = {
        "data": {
            k: (list(v) if isinstance(v, (list, tuple)) else v)
            for k, v in cfg.items()
            # Where the data lives may change (a moved directory); its content is checked below.
            if k not in ("cache_dir", "paths")
        },
        "tokenizer": [tokenizer.name, tokenizer.vocab_size, tokenizer.eos_id],
        "corpus": [len(corpus), int(corpus.offsets[-1]), _corpus_checksum(corpus)],
        **kwargs,
    }
    return hashlib.sha256(
        json.dumps(what, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]


def _corpus_checksum(corpus: Corpus) -> int:
    """A cheap content checksum of the corpus (offsets + a strided sample of the bytes)."""
    crc = zlib.crc32(corpus.offsets.tobytes())
    return zlib.crc32(corpus.data[:: max(1, len(corpus.data) // 65536)].tobytes(), crc)


def _check_positive(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value <= 0
    ):
        raise ValueError(
            f"build_pipeline: {name} must be a positive int, got {value!r}"
        )


def build_pipeline(
    cfg: ml_collections.ConfigDict,
    *,
    tokenizer: Tokenizer,
    split: str,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    corpus: Corpus | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> DataIterator:
    """A deterministic, resumable iterator of packed batches for `split` ("train" or "eval").

    Each batch is a dict of numpy arrays:
      tokens      int32   [B, S]  token ids (0 on padding)
      segment_ids int32   [B, S]  1, 2, 3, ... per document chunk within each row; 0 = padding
      positions   int32   [B, S]  position within its chunk, restarting at 0 (0 on padding)
      targets     int32   [B, S]  the next token of the same chunk, else 0
      loss_mask   float32 [B, S]  1 where `targets` is a real next token, else 0

    The same seed gives the same batches on any machine. Shuffling applies to the train split
    only. `num_epochs=None` repeats forever; with an int the iterator ends after that many passes
    and the final partial batch is padded. `corpus` may be passed to reuse a loaded corpus.

    `batch_size` is the global batch. With `process_count > 1` (pass `jax.process_index()` and
    `jax.process_count()`) each batch holds only this process's `batch_size // process_count` rows,
    `process_rows(...)` of the global batch; the state and fingerprint are those of the global stream.
    """
    validate_data_config(cfg)
    _check_positive("seq_len", seq_len)
    _check_positive("batch_size", batch_size)
    if num_epochs is not None:
        _check_positive("num_epochs", num_epochs)
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        or not 0 <= seed < 2**32
    ):
        raise ValueError(
            f"build_pipeline: seed must be an int in [0, 2**32), got {seed!r}"
        )
    rows = process_rows(batch_size, process_index, process_count)
    corpus = load_corpus(cfg) if corpus is None else corpus
    indices = split_indices(corpus, split, cfg.eval_fraction)
    is_train = split == "train"

    ds = grain.MapDataset.source(indices.tolist())
    if is_train and cfg.shuffle:
        ds = EpochShuffleMapDataset(ds, seed=int(seed))
    ds = ds.repeat(num_epochs)
    ds = ds.map(_Tokenize(corpus, tokenizer, tokenizer.eos_id if cfg.add_eos else -1))
    # In-memory documents: no reader threads (the grain docs advise 0 to avoid GIL contention).
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    it = grain.experimental.ConcatThenSplitIterDataset(
        it, length_struct={"tokens": seq_len}
    )
    it = it.map(_make_row)
    if is_train and cfg.shuffle and cfg.shuffle_buffer > 0:
        it = WindowShuffleIterDataset(
            it, window_size=cfg.shuffle_buffer, seed=int(seed)
        )
    it = it.batch(batch_size, drop_remainder=False)
    it = it.map(_PadBatch(batch_size))
    if process_count > 1:
        it = it.map(_ProcessRows(rows))
    if cfg.num_workers > 0:
        # grain's workers read absl flags; outside an absl app (pytest, Colab) take their defaults.
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.multiprocessing.MultiprocessingOptions(num_workers=cfg.num_workers)
        )
    fingerprint = _fingerprint(
        cfg,
        corpus,
        tokenizer,
        split=split,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=int(seed),
        epochs=num_epochs,
    )
    return DataIterator(it, fingerprint, num_docs=len(indices), rows=rows, global_batch_size=batch_size)
