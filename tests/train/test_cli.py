"""The CLI's bad-input contract: one line on stderr, exit status 2, nothing written to the workdir."""

import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]


def run_cli(workdir, *overrides, config="configs/tiny.py"):
    cmd = [sys.executable, "-m", "v4jax.train", f"--config={config}", f"--workdir={workdir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def assert_one_line_error(result, pattern):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and pattern in lines[0], lines[0]


def snapshot(directory):
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in pathlib.Path(directory).rglob("*")}


def test_unknown_config_key(tmp_path):
    result = run_cli(tmp_path / "w", "--config.train.stpes=3")
    assert_one_line_error(result, 'config.train.stpes: unknown field (did you mean "steps"?)')
    assert not (tmp_path / "w").exists()


def test_bad_value_and_missing_data_path(tmp_path):
    assert_one_line_error(run_cli(tmp_path / "w", "--config.train.steps=0"), "config.train.steps")
    result = run_cli(tmp_path / "w", "--config.data.source=files", "--config.data.paths=/nope")
    assert_one_line_error(result, "config.data.paths")
    assert not (tmp_path / "w").exists()


def test_checkpoint_of_another_model_is_refused_and_untouched(tmp_path):
    from v4jax.train.checkpoint import Checkpointer

    workdir = tmp_path / "w"
    ck = Checkpointer(str(workdir / "checkpoints"), 3)
    ck.save(5, {"w": np.zeros(2)}, {"model_fingerprint": "some-other-model"}, {"_": np.zeros(1, np.int32)})
    ck.close()
    (workdir / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    before = snapshot(workdir)
    assert_one_line_error(run_cli(workdir), "different model config")
    assert snapshot(workdir) == before
