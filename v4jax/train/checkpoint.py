"""Checkpoints with orbax: async, keeps N, atomic, resumable, and refuses a different model.

Each checkpoint `DIR/checkpoints/<step>/` holds three orbax items:
  state    the TrainState leaves as a flat {leafNNNNN: array} dict (flat so that any optax state
           structure, empty nodes included, round-trips exactly; the leaf paths are kept in `meta`),
  meta     JSON: step, model fingerprint, leaf paths, data-iterator state, spike-detector state, ...
  routing  cached anticipatory-routing indices (arrays) still waiting to be used.
orbax writes each step into a temporary directory and renames it when complete, so a kill -9 leaves
either a whole checkpoint or none. A checkpoint that fails to restore is moved aside to
`DIR/corrupt_checkpoints/<step>` (never deleted) and the previous one is used.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from v4jax.model.config import ConfigError

ITEMS = ("state", "meta", "routing")


class CheckpointMismatchError(ConfigError):
    """The workdir holds a checkpoint of another model config (or optimizer state layout)."""


def _leaf_paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def flatten_state(tree: Any) -> tuple[dict[str, Any], list[str]]:
    """pytree -> ({leafNNNNN: leaf}, leaf paths)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return {f"leaf{i:05d}": leaf for i, leaf in enumerate(leaves)}, _leaf_paths(tree)


def unflatten_state(template: Any, flat: dict[str, Any]) -> Any:
    """Inverse of `flatten_state`, with the tree structure of `template`."""
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, [flat[f"leaf{i:05d}"] for i in range(treedef.num_leaves)])


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def existing_steps(directory: str) -> list[int]:
    """Steps of the complete checkpoints in `directory` (empty when none), without creating anything."""
    if not os.path.isdir(directory):
        return []
    return sorted(_read_only_manager(directory).all_steps())


def check_compatible(directory: str, fingerprint: str) -> None:
    """Raises a one-line CheckpointMismatchError when the newest readable checkpoint is of another model."""
    steps = existing_steps(directory)
    if not steps:
        return
    manager = _read_only_manager(directory)
    for step in reversed(steps):
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception:  # noqa: BLE001, S112  unreadable: the restore path falls back past it and says so
            continue
        if meta.get("model_fingerprint") != fingerprint:
            raise CheckpointMismatchError(
                f"workdir {os.path.dirname(directory.rstrip('/'))} holds a checkpoint (step {step}) of a different "
                f"model config (fingerprint {meta.get('model_fingerprint')} != {fingerprint}); use another --workdir")
        return


class Checkpointer:
    """Saves and restores TrainState + JSON metadata + routing cache under `directory`."""

    def __init__(self, directory: str, keep: int, *, use_async: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                               cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], routing: dict[str, np.ndarray]) -> None:
        """Starts an async save of `state` (any pytree), `meta` (JSON) and `routing` (arrays) at `step`."""
        flat, paths = flatten_state(state)
        meta = dict(meta, step=int(step), leaf_paths=paths)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta),
            routing=ocp.args.StandardSave(routing)), force=True)

    def restore_latest(self, template: Any) -> tuple[int, Any, dict[str, Any], dict[str, np.ndarray]] | None:
        """Restores the newest readable checkpoint into the structure of `template` (abstract or concrete).

        Unreadable checkpoints are moved aside with a warning on stderr. Returns None when none is left.
        """
        steps = self.all_steps()
        for i in range(len(steps) - 1, -1, -1):
            step = steps[i]
            try:
                return (step, *self._restore(step, template))
            except CheckpointMismatchError:
                raise
            except Exception as err:  # noqa: BLE001  orbax raises many types for damaged files; all mean "unreadable"
                fallback = f"step {steps[i - 1]}" if i > 0 else "a fresh start"
                print(f"warning: checkpoint at step {step} is unreadable; falling back to {fallback} "
                      f"({type(err).__name__})", file=sys.stderr, flush=True)
                self._move_aside(step)
        return None

    def _restore(self, step: int, template: Any):
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if meta.get("leaf_paths") != _leaf_paths(template):
            raise CheckpointMismatchError(
                f"checkpoint at step {step} has a different state layout (model or optimizer config changed); "
                "use another --workdir")
        flat_template, _ = flatten_state(template)
        # restore into the template's shardings: a checkpoint saved on one mesh loads onto another
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), flat_template)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), routing=ocp.args.StandardRestore()))
        routing = {k: np.asarray(v) for k, v in restored.routing.items()}
        return unflatten_state(template, restored.state), meta, routing

    def _move_aside(self, step: int) -> None:
        """Moves an unreadable step out of the checkpoint directory: process 0 moves it (the directory is
        shared by every process of a multi-process run), the others wait for that before re-listing."""
        if jax.process_index() == 0:
            aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
            os.makedirs(aside, exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), os.path.join(aside, str(step)))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"v4jax_checkpoint_moved_aside_{step}")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
