"""Byte tokenizer round trips; tokenizer.json files load through HF `tokenizers`."""

import pytest

from v4jax.data import build_tokenizer, default_data_config

TEXT = "def f(x):\n    return 'é 漢字 🙂'\n"


def test_byte_tokenizer_round_trip():
    tok = build_tokenizer(default_data_config())
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids) and tok.vocab_size == 256
    assert tok.decode(ids) == TEXT
    assert tok.eos_id == 0 and tok.eos_id not in ids
    assert tok.encode_bytes(TEXT.encode()).tolist() == ids


def test_byte_tokenizer_decodes_cut_characters():
    ids = "漢".encode()[:2]  # a character cut by the packer
    assert build_tokenizer(default_data_config()).decode(list(ids)) == "\ufffd"


def _save_word_level(tmp_path, with_eos: bool) -> str:
    tokenizers = pytest.importorskip(
        "tokenizers", reason="HF tokenizers is not installed (pip install tokenizers)"
    )
    words = ["hello", "world", "the", "cat"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    if with_eos:
        vocab["</s>"] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    if with_eos:
        tok.add_special_tokens(["</s>"])
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    return path


def test_tokenizer_json_via_hf_tokenizers(tmp_path):
    cfg = default_data_config()
    cfg.tokenizer = _save_word_level(tmp_path, with_eos=True)
    tok = build_tokenizer(cfg)
    assert tok.vocab_size == 6
    assert tok.eos_id == 5  # found by name: </s>
    ids = tok.encode("hello the cat dog")
    assert ids == [1, 3, 4, 0]
    assert tok.decode(ids[:3]) == "hello the cat"
    assert tok.encode_bytes(b"world world").tolist() == [2, 2]


def test_tokenizer_json_without_eos(tmp_path):
    cfg = default_data_config()
    cfg.tokenizer = _save_word_level(tmp_path, with_eos=False)
    with pytest.raises(
        ValueError,
        match=r"^config.data.eos_id: tokenizer tokenizer.json has no EOS token",
    ) as info:
        build_tokenizer(cfg)
    assert "\n" not in str(info.value)
    cfg.eos_id = 0  # a configured id works
    assert build_tokenizer(cfg).eos_id == 0
    cfg.eos_id, cfg.add_eos = -1, False  # or no EOS at all
    assert build_tokenizer(cfg).eos_id == -1
