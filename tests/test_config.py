"""The top-level config: defaults validate, every bad value is a one-line ConfigError naming the field."""

import importlib.util
import pathlib

import pytest

from v4jax import config as config_lib
from v4jax.config import ConfigError

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config_file(name: str, arg=None):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_default_config_has_every_block_and_validates():
    config = config_lib.default_config()
    assert set(config.keys()) == {"model", "train", "optim", "data", "stability", "qat", "mesh"}
    config_lib.validate(config)


@pytest.mark.parametrize("name,arg", [("tiny", None), ("tiny", "anticipatory"), ("tiny", "paper_mtp"),
                                      ("v4_flash", None), ("v4_pro", None)])
def test_config_files_validate(name, arg):
    config_lib.validate(load_config_file(name, arg))


def test_released_presets_carry_the_paper_optimizer_settings():
    flash, pro = load_config_file("v4_flash"), load_config_file("v4_pro")
    assert (flash.optim.lr, pro.optim.lr) == (2.7e-4, 2.0e-4)
    assert flash.optim.schedule == pro.optim.schedule == "wsd"
    assert flash.model.num_layers == 43 and pro.model.num_layers == 61
    assert flash.train.mtp_weight_schedule == "paper"


def test_unknown_variant_is_one_line_error():
    with pytest.raises(ConfigError, match=r"^configs/tiny.py:nope: unknown variant"):
        load_config_file("tiny", "nope")


@pytest.mark.parametrize("field,value,pattern", [
    ("steps", 0, r"config\.train\.steps: must be a positive integer"),
    ("batch_size", -2, r"config\.train\.batch_size"),
    ("seq_len", -1, r"config\.train\.seq_len"),
    ("checkpoint_every", 0, r"config\.train\.checkpoint_every"),
    ("mtp_weight", -0.1, r"config\.train\.mtp_weight"),
    ("mtp_weight_schedule", "cosine", r"config\.train\.mtp_weight_schedule"),
    ("sample_temperature", float("nan"), r"config\.train\.sample_temperature"),
])
def test_bad_train_values_are_one_line_errors(field, value, pattern):
    config = config_lib.default_config()
    with config.unlocked():
        config.train[field] = value
    with pytest.raises(ConfigError, match=pattern) as info:
        config_lib.validate(config)
    assert "\n" not in str(info.value)


def test_unknown_train_key_is_rejected():
    config = config_lib.default_config()
    with config.unlocked():
        config.train.stpes = 3
    with pytest.raises(ConfigError, match=r"config\.train\.stpes: unknown field"):
        config_lib.validate(config)


@pytest.mark.parametrize("value,ok", [(1, True), (-1, True), (4, True), (0, False), (-2, False)])
def test_mesh_sizes(value, ok):
    config = config_lib.default_config()
    config.mesh.expert = value
    if ok:
        config_lib.validate(config)
    else:
        with pytest.raises(ConfigError, match=r"config\.mesh\.expert"):
            config_lib.validate(config)


def test_tokenizer_vocab_must_fit_the_model():
    config = config_lib.default_config()
    config.model.vocab_size = 100  # the byte tokenizer needs 256
    with pytest.raises(ConfigError, match=r"config\.model\.vocab_size"):
        config_lib.validate(config)


def test_model_fingerprint_tracks_the_model_block_only():
    a, b = config_lib.default_config(), config_lib.default_config()
    b.train.steps = 7
    assert config_lib.model_fingerprint(a) == config_lib.model_fingerprint(b)
    b.model.hidden_size = 64
    assert config_lib.model_fingerprint(a) != config_lib.model_fingerprint(b)
