"""The packing pipeline: invariants against a brute-force packer, determinism, exact resume."""

import json

import numpy as np
import pytest

from v4jax.data import build_pipeline, build_tokenizer, default_data_config, load_corpus

from .corpus_files import files_config, write_corpus

KEYS = ("tokens", "segment_ids", "positions", "targets", "loss_mask")


@pytest.fixture
def user_cfg(tmp_path):
    write_corpus(str(tmp_path))
    return files_config([str(tmp_path)])


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(KEYS)
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _brute_force_rows(docs, seq_len):
    """Concatenate (doc id, token) pairs, cut rows of seq_len, label segments/positions/targets by hand."""
    stream = [(d, t) for d, doc in enumerate(docs) for t in doc]
    rows = []
    for start in range(0, len(stream), seq_len):
        chunk = stream[start : start + seq_len]
        row = {k: [0] * seq_len for k in KEYS}
        segment, seen = 0, {}
        for t, (doc, tok) in enumerate(chunk):
            if doc not in seen:
                segment += 1
                seen[doc] = t
            row["tokens"][t] = tok
            row["segment_ids"][t] = segment
            row["positions"][t] = t - seen[doc]
        for t in range(seq_len - 1):
            if t + 1 < len(chunk) and chunk[t + 1][0] == chunk[t][0]:
                row["targets"][t] = chunk[t + 1][1]
                row["loss_mask"][t] = 1
        rows.append(row)
    return rows


@pytest.mark.parametrize("seq_len", [7, 16, 64])
def test_packing_matches_brute_force(user_cfg, seq_len):
    user_cfg.shuffle = False
    tok = build_tokenizer(user_cfg)
    corpus = load_corpus(user_cfg)
    docs = [list(corpus.document(i)) + [tok.eos_id] for i in range(len(corpus))]
    expected = _brute_force_rows(docs, seq_len)
    batch_size = 3
    it = build_pipeline(
        user_cfg,
        tokenizer=tok,
        split="train",
        seq_len=seq_len,
        batch_size=batch_size,
        num_epochs=1,
    )
    batches = list(it)
    assert len(batches) == -(-len(expected) // batch_size)
    for b in batches:
        assert b["tokens"].dtype == np.int32 and b["segment_ids"].dtype == np.int32
        assert b["positions"].dtype == np.int32 and b["targets"].dtype == np.int32
        assert b["loss_mask"].dtype == np.float32
        assert all(b[k].shape == (batch_size, seq_len) for k in KEYS)
    rows = [{k: b[k][r] for k in KEYS} for b in batches for r in range(batch_size)]
    for i, row in enumerate(rows):
        if i < len(expected):
            for k in KEYS:
                np.testing.assert_array_equal(
                    row[k], expected[i][k], err_msg=f"row {i} {k}"
                )
        else:  # the final partial batch is padded with empty rows
            assert not row["segment_ids"].any() and not row["loss_mask"].any()


def test_invariants_on_stdlib_with_shuffle(tmp_path):
    cfg = default_data_config()
    cfg.cache_dir, cfg.max_files, cfg.shuffle_buffer = str(tmp_path), 30, 16
    tok = build_tokenizer(cfg)
    it = build_pipeline(
        cfg, tokenizer=tok, split="train", seq_len=96, batch_size=4, seed=3
    )
    for b in _take(it, 20):
        for r in range(4):
            seg, pos, tokens = b["segment_ids"][r], b["positions"][r], b["tokens"][r]
            assert (
                seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
            )
            starts = np.flatnonzero(np.diff(seg, prepend=0) != 0)
            assert np.all(pos[starts] == 0)
            within = np.diff(seg) == 0
            assert np.all(np.diff(pos)[within] == 1)
            # Every EOS ends its segment: the next token, if any, starts a new one.
            for t in np.flatnonzero(tokens[:-1] == tok.eos_id):
                assert seg[t] > 0 and seg[t + 1] != seg[t]
                assert b["loss_mask"][r, t] == 0
            assert b["loss_mask"][r, -1] == 0


def test_epoch_covers_every_document_once_and_reshuffles(user_cfg):
    tok = build_tokenizer(user_cfg)
    corpus = load_corpus(user_cfg)
    user_cfg.shuffle_buffer = 0

    def documents(batches):
        # Without the row shuffle, the rows in order are the token stream cut into pieces:
        # glue the non-padding tokens back together and cut at EOS.
        stream = b"".join(
            bytes(b["tokens"][r][b["segment_ids"][r] > 0].astype(np.uint8))
            for b in batches
            for r in range(2)
        )
        assert stream.endswith(b"\0")
        return [d + b"\0" for d in stream[:-1].split(b"\0")]

    it = build_pipeline(
        user_cfg,
        tokenizer=tok,
        split="train",
        seq_len=16,
        batch_size=2,
        seed=1,
        num_epochs=2,
    )
    docs = documents(list(it))
    want = sorted(corpus.document(i) + b"\0" for i in range(len(corpus)))
    n = len(corpus)
    assert len(docs) == 2 * n
    assert sorted(docs[:n]) == want and sorted(docs[n:]) == want
    assert docs[:n] != docs[n:]  # a new order each epoch


def test_same_seed_same_batches_other_seed_differs(user_cfg):
    tok = build_tokenizer(user_cfg)

    def run(seed):
        return _take(
            build_pipeline(
                user_cfg,
                tokenizer=tok,
                split="train",
                seq_len=16,
                batch_size=2,
                seed=seed,
            ),
            12,
        )

    _assert_batches_equal(run(5), run(5))
    assert any(
        not np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(run(5), run(6))
    )


@pytest.mark.parametrize("shuffle_buffer", [0, 8])
def test_resume_from_json_state_is_exact(user_cfg, shuffle_buffer):
    user_cfg.shuffle_buffer = shuffle_buffer
    tok = build_tokenizer(user_cfg)

    def fresh():
        return build_pipeline(
            user_cfg, tokenizer=tok, split="train", seq_len=16, batch_size=2, seed=7
        )

    it = fresh()
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    after = _take(it, 3)
    restored = fresh()
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 3), after)
    # Many restore points, including mid-document ones, all resume exactly.
    reference = _take(fresh(), 40)
    it = fresh()
    for step in range(0, 37, 3):
        state = json.loads(json.dumps(it.get_state()))
        restored = fresh()
        restored.set_state(state)
        _assert_batches_equal(_take(restored, 3), reference[step : step + 3])
        _take(it, 3)


def test_resume_through_orbax_json(user_cfg, tmp_path_factory):
    import orbax.checkpoint as ocp

    tok = build_tokenizer(user_cfg)
    it = build_pipeline(
        user_cfg, tokenizer=tok, split="train", seq_len=16, batch_size=2, seed=0
    )
    _take(it, 4)
    path = (
        tmp_path_factory.mktemp("ckpt") / "data_state"
    )  # not inside the corpus directory
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckpt:
        ckpt.save(path, args=ocp.args.JsonSave(it.get_state()))
        state = ckpt.restore(path, args=ocp.args.JsonRestore())
    after = _take(it, 2)
    restored = build_pipeline(
        user_cfg, tokenizer=tok, split="train", seq_len=16, batch_size=2, seed=0
    )
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 2), after)


def test_state_from_another_pipeline_is_refused(user_cfg):
    tok = build_tokenizer(user_cfg)
    it = build_pipeline(
        user_cfg, tokenizer=tok, split="train", seq_len=16, batch_size=2, seed=0
    )
    other = build_pipeline(
        user_cfg, tokenizer=tok, split="train", seq_len=32, batch_size=2, seed=0
    )
    with pytest.raises(ValueError, match="^data state: saved by a different pipeline"):
        other.set_state(it.get_state())


def test_eval_split_is_unshuffled_and_disjoint(tmp_path):
    cfg = default_data_config()
    cfg.cache_dir, cfg.max_files, cfg.eval_fraction = str(tmp_path), 60, 0.2
    tok = build_tokenizer(cfg)
    corpus = load_corpus(cfg)

    def texts(split, seed):
        it = build_pipeline(
            cfg,
            tokenizer=tok,
            split=split,
            seq_len=4096,
            batch_size=1,
            seed=seed,
            num_epochs=1,
            corpus=corpus,
        )
        return [
            tok.decode(b["tokens"][0][b["segment_ids"][0] == 1][:-1])
            for b in it
            if b["segment_ids"][0, 0] == 1
        ]

    eval_a, eval_b = texts("eval", 0), texts("eval", 1)
    assert eval_a == eval_b  # seed does not shuffle eval
    train = set(texts("train", 0))
    assert eval_a and train and train.isdisjoint(eval_a)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(user_cfg):
    tok = build_tokenizer(user_cfg)

    def make(workers):
        user_cfg.num_workers = workers
        return build_pipeline(
            user_cfg, tokenizer=tok, split="train", seq_len=16, batch_size=2, seed=2
        )

    with make(0) as it:
        reference = [{k: v.copy() for k, v in b.items()} for b in _take(it, 8)]
    with make(1) as it:
        batches = [{k: v.copy() for k, v in b.items()} for b in _take(it, 5)]
        state = json.loads(json.dumps(it.get_state()))
    _assert_batches_equal(batches, reference[:5])
    with make(1) as it:
        it.set_state(state)
        _assert_batches_equal(
            [{k: v.copy() for k, v in b.items()} for b in _take(it, 3)], reference[5:8]
        )
