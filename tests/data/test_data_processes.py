"""Multi-host data: each process keeps its block of rows of the same global batch (simulated processes)."""

import numpy as np
import pytest

from v4jax.data import build_pipeline, build_tokenizer, load_corpus, process_rows

from .corpus_files import files_config, write_corpus

KEYS = ("tokens", "segment_ids", "positions", "targets", "loss_mask")


@pytest.fixture
def user_cfg(tmp_path):
    write_corpus(str(tmp_path))
    cfg = files_config([str(tmp_path)])
    cfg.shuffle_buffer = 16  # the window shuffle too: every process must shuffle the same way
    return cfg


def pipelines(cfg, counts, batch_size=8, seq_len=32):
    tok, corpus = build_tokenizer(cfg), load_corpus(cfg)
    return [build_pipeline(cfg, tokenizer=tok, split="train", seq_len=seq_len, batch_size=batch_size, seed=3,
                           corpus=corpus, process_index=i, process_count=n) for i, n in counts]


@pytest.mark.parametrize("count", [2, 4])
def test_process_blocks_are_disjoint_and_cover_the_global_batch(user_cfg, count):
    whole, *parts = pipelines(user_cfg, [(0, 1)] + [(i, count) for i in range(count)])
    assert [p.rows for p in parts] == [slice(i * 8 // count, (i + 1) * 8 // count) for i in range(count)]
    for _ in range(5):
        g = next(whole)
        local = [next(p) for p in parts]
        for k in KEYS:
            assert all(b[k].shape == (8 // count, 32) for b in local)
            np.testing.assert_array_equal(np.concatenate([b[k] for b in local]), g[k], err_msg=k)
        # disjoint: no row of one process appears in another (real text rows, no padding here)
        rows = [tuple(r) for b in local for r in b["tokens"]]
        assert (g["segment_ids"] > 0).all() and len(set(rows)) == len(rows) == 8


def test_state_is_the_global_streams_and_resumes_on_another_process_count(user_cfg):
    whole, half = pipelines(user_cfg, [(0, 1), (1, 2)])
    for _ in range(3):
        next(whole), next(half)
    assert half.get_state() == whole.get_state()  # same position, same fingerprint
    state = whole.get_state()
    expected = next(whole)
    (resumed,) = pipelines(user_cfg, [(1, 2)])
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["tokens"], expected["tokens"][4:])


@pytest.mark.parametrize("batch, index, count, msg", [
    (6, 0, 4, "batch_size 6 does not split over 4 processes"),
    (8, 2, 2, r"process_index 2 is not in \[0, process_count 2\)"),
    (8, 0, 0, r"process_index 0 is not in \[0, process_count 0\)"),
])
def test_bad_process_arguments(batch, index, count, msg):
    with pytest.raises(ValueError, match=msg):
        process_rows(batch, index, count)
