"""Checkpointer: exact round trip, keeps N, refuses another model, falls back past a corrupted latest step."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.train import checkpoint as ckpt_lib


def make_tree(scale: float):
    return {"params": {"w": jnp.arange(6.0).reshape(2, 3) * scale}, "opt": (jnp.ones(3) * scale, {}),
            "step": jnp.asarray(int(scale), jnp.int32)}


def save_steps(directory, steps, keep=5, fingerprint="abc"):
    ck = ckpt_lib.Checkpointer(directory, keep)
    for s in steps:
        ck.save(s, make_tree(float(s)), {"model_fingerprint": fingerprint, "data_iterator": {"pos": s}},
                {"_": np.zeros(1, np.int32), "q0": np.full((2, 2), s, np.int32)})
    ck.close()


def test_round_trip_is_exact_and_keeps_n(tmp_path):
    directory = str(tmp_path / "checkpoints")
    save_steps(directory, [1, 2, 3], keep=2)
    ck = ckpt_lib.Checkpointer(directory, 2)
    assert ck.all_steps() == [2, 3]
    step, tree, meta, routing = ck.restore_latest(make_tree(0.0))
    assert step == 3 and meta["data_iterator"] == {"pos": 3}
    np.testing.assert_array_equal(tree["params"]["w"], np.arange(6.0).reshape(2, 3) * 3)
    np.testing.assert_array_equal(routing["q0"], np.full((2, 2), 3))
    assert tree["opt"][1] == {} and int(tree["step"]) == 3


def test_check_compatible_refuses_another_model(tmp_path):
    directory = str(tmp_path / "checkpoints")
    save_steps(directory, [2], fingerprint="model-a")
    ckpt_lib.check_compatible(directory, "model-a")
    ckpt_lib.check_compatible(str(tmp_path / "empty"), "model-b")  # no checkpoints: fine
    assert not os.path.exists(tmp_path / "empty")  # and nothing created
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="different model config") as info:
        ckpt_lib.check_compatible(directory, "model-b")
    assert "\n" not in str(info.value)


def test_corrupted_latest_falls_back_to_previous(tmp_path, capsys):
    directory = str(tmp_path / "checkpoints")
    save_steps(directory, [2, 4])
    state_dir = os.path.join(directory, "4", "state")
    for root, _, files in os.walk(state_dir):  # damage every data file of the newest state
        for name in files:
            if "ocdbt" in root or name.startswith("manifest"):
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(3)
    ck = ckpt_lib.Checkpointer(directory, 5)
    step, tree, meta, _ = ck.restore_latest(make_tree(0.0))
    assert step == 2 and meta["data_iterator"] == {"pos": 2}
    np.testing.assert_array_equal(tree["params"]["w"], np.arange(6.0).reshape(2, 3) * 2)
    err = capsys.readouterr().err
    assert "checkpoint at step 4 is unreadable" in err and "falling back to step 2" in err
    assert os.path.isdir(tmp_path / "corrupt_checkpoints" / "4")  # moved aside, not deleted
    assert ck.all_steps() == [2]


def test_layout_change_is_a_one_line_error(tmp_path):
    directory = str(tmp_path / "checkpoints")
    save_steps(directory, [1])
    ck = ckpt_lib.Checkpointer(directory, 5)
    other = {"params": {"w": jnp.zeros((2, 3)), "extra": jnp.zeros(2)}, "opt": (jnp.zeros(3), {}),
             "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="different state layout"):
        ck.restore_latest(other)
