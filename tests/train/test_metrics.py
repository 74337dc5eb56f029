"""MetricsWriter: the first process writes metrics.jsonl (and TensorBoard); the others of a multi-process run,
which share the workdir, keep their records in memory and write nothing."""

import json

from v4jax.train.metrics import MetricsWriter, truncate_jsonl


def test_primary_writes_jsonl_and_others_write_nothing(tmp_path):
    primary, other = tmp_path / "primary", tmp_path / "other"
    primary.mkdir()
    other.mkdir()
    for workdir, is_primary in ((primary, True), (other, False)):
        w = MetricsWriter(str(workdir), tensorboard=False, primary=is_primary)
        w.write(10, {"loss": 2.5, "per_layer": [1, 2]})
        w.write(20, {"loss": 2.0})
        w.close()
        assert [r["step"] for r in w.records] == [10, 20]
    lines = (primary / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"step": 10, "loss": 2.5, "per_layer": [1, 2]},
                                              {"step": 20, "loss": 2.0}]
    assert list(other.iterdir()) == []
    truncate_jsonl(str(primary / "metrics.jsonl"), 10)  # a resume from step 10 drops later records
    assert [json.loads(x)["step"] for x in (primary / "metrics.jsonl").read_text().splitlines()] == [10]
