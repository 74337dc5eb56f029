"""Golden sharding specs: V4-Flash laid out on an abstract 256-device mesh (data=8 x expert=32, no devices).

Every parameter's PartitionSpec must equal the committed table `golden/v4_flash_data8_expert32.txt`
(regenerate it on purpose with `V4JAX_UPDATE_GOLDEN=1 pytest tests/parallel/test_golden_specs.py`),
and the per-device bytes of parameters + optimizer state (the paper recipe: Muon + AdamW, fp32) must fit
an H200. Abstract shapes only: nothing is allocated, so this runs in seconds on CPU.
"""

import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import pytest

from v4jax.model import ModelConfig, Transformer
from v4jax.optim import build_optimizer
from v4jax.parallel import ShardingRules, abstract_mesh
from v4jax.parallel import shardings as sh

GOLDEN = pathlib.Path(__file__).parent / "golden" / "v4_flash_data8_expert32.txt"
H200_BYTES = 139 * 2**30  # usable memory reported by the device (141 GB nominal)
CONFIGS = pathlib.Path(__file__).parents[2] / "configs"


@pytest.fixture(scope="module")
def flash():
    spec = importlib.util.spec_from_file_location("v4_flash_config", CONFIGS / "v4_flash.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    model = Transformer(ModelConfig.from_config(config.model))
    abstract, logical = sh.abstract_variables(model, jax.ShapeDtypeStruct((1, 128), jnp.int32))
    tx = build_optimizer(config.optim, abstract["params"], config.train.steps)
    opt_state = jax.eval_shape(tx.init, abstract["params"])
    return abstract["params"], logical["params"], opt_state


def table(params, specs) -> str:
    rows = []
    for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                  jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        rows.append(f"{name}  {list(leaf.shape)}  {tuple(spec)}")
    return "\n".join(rows) + "\n"


def test_v4_flash_specs_match_golden_table(flash):
    params, logical, _ = flash
    mesh = abstract_mesh(data=8, expert=32)
    got = table(params, sh.specs_from_logical(params, logical, ShardingRules(), mesh))
    if os.environ.get("V4JAX_UPDATE_GOLDEN"):
        GOLDEN.write_text(got)
    want = GOLDEN.read_text()
    diff = [f"{a!r} != {b!r}" for a, b in zip(got.splitlines(), want.splitlines()) if a != b]
    assert got.count("\n") == want.count("\n"), "parameter set changed: regenerate the golden table on purpose"
    assert not diff, "\n".join(diff[:10])
    # what the table encodes: routed experts split 32 ways; the scanned layers axis (first) never split
    expert_rows = [r for r in got.splitlines() if "/experts/w" in r]
    assert expert_rows and all("'expert'" in r for r in expert_rows)
    assert all(r.split("  ")[-1].startswith("(None,") for r in got.splitlines() if r.startswith("seg"))


@pytest.mark.parametrize("mesh_sizes", [{"data": 8, "expert": 32}, {"fsdp": 8, "expert": 32}])
def test_v4_flash_params_and_optimizer_fit_an_h200(flash, mesh_sizes):
    params, logical, opt_state = flash
    mesh = abstract_mesh(**mesh_sizes)
    specs = sh.specs_from_logical(params, logical, ShardingRules(), mesh)
    param_bytes = sh.per_device_bytes(params, specs, mesh)
    opt_bytes = sh.per_device_bytes(opt_state, sh.mirror_param_specs(opt_state, params, specs), mesh)
    total_params = sum(x.size for x in jax.tree.leaves(params))
    assert param_bytes < total_params * 4 / 16  # really split (replicated would be total * 4)
    assert param_bytes + opt_bytes < H200_BYTES, (param_bytes / 2**30, opt_bytes / 2**30)
