"""The README's two commands exist as written, .ci/run runs exactly the test command, and CI treats
pytest's "no tests collected" (exit 5) as a failure."""

import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_readme_shows_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert "./run train" in readme and "./run test" in readme
    assert "## The model" in readme


def test_ci_runs_the_readme_test_command():
    lines = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert "./run test" in lines


def test_run_rejects_unknown_subcommand_without_setup():
    result = subprocess.run([str(REPO / "run"), "nope"], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2 and "usage" in result.stderr


@pytest.mark.parametrize("pytest_status,ci_status", [(0, 0), (1, 1), (5, 1)])
def test_ci_fails_when_no_tests_are_collected(tmp_path, pytest_status, ci_status):
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", tmp_path / ".ci" / "run")
    fake = tmp_path / "run"
    fake.write_text(f"#!/usr/bin/env bash\n[ \"$1\" = test ] && exit {pytest_status}\nexit 99\n")
    fake.chmod(0o755)
    result = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == ci_status
