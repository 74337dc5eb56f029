"""Small user corpora written to a temporary directory, shared by the data tests."""

import json
import os

import ml_collections

from v4jax.data import default_data_config

DOCS = {
    "a.txt": "alpha beta gamma\n",
    "notes/b.md": "# Title\nsome *markdown* text, é and 漢字\n",
    "notes/deep/c.txt": "x" * 50,
    "d.py": "def f(x):\n    return x + 1\n",
}
JSONL = ["first json document", "second one, a little longer than the first", "third"]


def write_corpus(root: str) -> None:
    """Writes DOCS and a .jsonl file (JSONL, one document per line) under `root`."""
    for name, text in DOCS.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    with open(os.path.join(root, "e.jsonl"), "w", encoding="utf-8") as f:
        for i, text in enumerate(JSONL):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
            if i == 0:
                f.write("\n")  # blank lines are skipped


def files_config(paths: list[str], **overrides) -> ml_collections.ConfigDict:
    cfg = default_data_config()
    cfg.source = "files"
    cfg.paths = list(paths)
    cfg.eval_fraction = 0.0
    for k, v in overrides.items():
        cfg[k] = v
    return cfg
