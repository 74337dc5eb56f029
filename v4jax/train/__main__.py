"""Command line: `python -m v4jax.train --config=configs/tiny.py --workdir=DIR [--config.train.steps=200]`.

Also installed as the console script `v4jax-train`. Every input error (unknown config key, bad value,
missing config file or data path, a workdir holding another model's checkpoint) is printed as ONE
line `error: ...` on stderr with exit status 2, before anything is written to the workdir.
"""

from __future__ import annotations

import os
import re
import sys

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/tiny.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")

EXIT_USAGE = 2


def one_line(message: str) -> str:
    """The informative line of a possibly multi-line message (the cause, for an embedded traceback)."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    if len(lines) == 1:
        return lines[0]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])


def _fail(message: str) -> None:
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def _override_error(argv: list[str], err: Exception) -> str:
    """Names the override that failed: 'config.train.stpes: unknown field (did you mean "steps"?)'."""
    text = str(err)
    match = re.match(r"""^['"]?\\?['"]?(\w+)""", text.strip("'\""))
    bad_key = match.group(1) if match else None
    for arg in argv[1:]:
        m = re.match(r"--(config(?:\.\w+)+)(?:=.*)?$", arg)
        if m and bad_key and m.group(1).split(".")[-1] == bad_key:
            hint = re.search(r'Did you mean "(\w+)"', text)
            return f"{m.group(1)}: unknown field" + (f' (did you mean "{hint.group(1)}"?)' if hint else "")
    return text.replace("\n", " ")


def parse(argv: list[str]):
    """Parses flags; returns (config, workdir) or exits with a one-line error."""
    try:
        FLAGS(argv)
    except flags.Error as err:
        _fail(str(err))
    except (AttributeError, KeyError) as err:  # ml_collections: override of a field that does not exist
        _fail(_override_error(argv, err))
    except Exception as err:  # noqa: BLE001 - anything config_flags raises is a bad command line
        _fail(f"{type(err).__name__}: {err}")
    if FLAGS.config is None:
        _fail("--config is required (e.g. --config=configs/tiny.py)")
    try:
        config = FLAGS.config
        config.to_dict()  # a config file that failed to load raises here
    except Exception as err:  # noqa: BLE001
        _fail(f"--config: {one_line(str(err))}")
    if not _WORKDIR.value:
        _fail("--workdir is required")
    return config, _WORKDIR.value


def enable_compilation_cache() -> None:
    """Caches compiled steps on disk ($V4JAX_CACHE/jax, default ~/.cache/v4jax/jax): reruns and resumes
    skip most of the compile. An explicit JAX_COMPILATION_CACHE_DIR wins."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    root = os.path.expanduser(os.environ.get("V4JAX_CACHE") or "~/.cache/v4jax")
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax"))


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m v4jax.train` and the `v4jax-train` console script."""
    from absl import logging as absl_logging

    from v4jax.model.config import ConfigError

    argv = list(sys.argv if argv is None else argv)
    config, workdir = parse(argv)
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax reports routine events as absl warnings
    absl_logging.use_python_logging()
    enable_compilation_cache()
    from v4jax.parallel.distributed import maybe_initialize_distributed
    from v4jax.train.loop import train

    maybe_initialize_distributed()  # several processes (one per host / TPU VM): join them before using devices

    try:
        train(config, workdir)
    except ConfigError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
