"""Spike detector and anticipation controller on synthetic loss curves."""

import json
import math

import numpy as np
import pytest

from v4jax.model.config import ConfigError
from v4jax.train.stability import (
    AnticipationController,
    SpikeDetector,
    default_stability_config,
    validate_stability_config,
)


def _cfg(**overrides):
    cfg = default_stability_config()
    cfg.spike_detection = True
    cfg.update(overrides)
    return cfg


def _curve(n, seed=0, noise=0.02):
    rng = np.random.default_rng(seed)
    return 4.0 * np.exp(-np.arange(n) / 400) + 2.0 + noise * rng.standard_normal(n)


def _events(detector, losses):
    return [
        e
        for t, loss in enumerate(losses)
        if (e := detector.observe(t, float(loss))) is not None
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flat_noisy_curve_has_no_events(seed):
    detector = SpikeDetector(_cfg())
    assert _events(detector, _curve(1500, seed)) == []
    assert detector.metrics() == {
        "stability/nonfinite_steps": 0.0,
        "stability/spikes": 0.0,
        "stability/rollbacks": 0.0,
    }


@pytest.mark.parametrize(
    "mode",
    [
        {"spike_threshold": 4.0, "spike_ratio": 0.0},
        {"spike_threshold": 0.0, "spike_ratio": 1.5},
    ],
)
def test_injected_spike_detected_once(mode):
    losses = _curve(400)
    losses[300] *= 2.5
    detector = SpikeDetector(_cfg(**mode))
    events = _events(detector, losses)
    assert [(e.kind, e.step, e.rollback) for e in events] == [("spike", 300, True)]
    assert events[0].metrics()["stability/spike"] == 1.0
    assert detector.metrics()["stability/rollbacks"] == 1.0
    assert 300 not in [
        s for s, _ in detector.history
    ]  # the spike does not pollute the window


def test_no_verdict_before_min_history():
    losses = _curve(60)
    losses[10] *= 5
    assert _events(SpikeDetector(_cfg(min_history=20)), losses) == []
    assert len(_events(SpikeDetector(_cfg(min_history=5)), losses)) == 1


def test_nonfinite_counted_and_skipped():
    losses = list(_curve(100))
    losses[40], losses[41], losses[70] = float("nan"), float("inf"), float("-inf")
    detector = SpikeDetector(_cfg())
    events = _events(detector, losses)
    assert [(e.kind, e.step, e.skip_update) for e in events] == [
        ("nonfinite", 40, True),
        ("nonfinite", 41, True),
        ("nonfinite", 70, True),
    ]
    assert detector.metrics()["stability/nonfinite_steps"] == 3.0
    assert all(math.isfinite(v) for _, v in detector.history)
    no_skip = SpikeDetector(_cfg(skip_nonfinite=False, spike_detection=False)).observe(
        0, float("nan")
    )
    assert no_skip.kind == "nonfinite" and not no_skip.skip_update


def test_rollbacks_capped():
    losses = _curve(300)
    for t in (100, 150, 200, 250):
        losses[t] *= 3
    events = _events(SpikeDetector(_cfg(max_rollbacks=2)), losses)
    assert [e.step for e in events] == [100, 150, 200, 250]
    assert [e.rollback for e in events] == [True, True, False, False]


def test_rolled_back_to_forgets_replayed_steps():
    detector = SpikeDetector(_cfg())
    _events(detector, _curve(80))
    detector.rolled_back_to(60)
    assert max(s for s, _ in detector.history) == 60


def test_state_round_trip_continues_identically():
    losses = _curve(300, seed=4)
    losses[250] *= 3
    losses[120] = float("nan")
    whole = SpikeDetector(_cfg())
    expected = _events(whole, losses)
    first = SpikeDetector(_cfg())
    _events(first, losses[:200])
    state = json.loads(json.dumps(first.state_dict()))  # must be plain JSON
    resumed = SpikeDetector(_cfg())
    resumed.load_state_dict(state)
    got = [
        e
        for t in range(200, 300)
        if (e := resumed.observe(t, float(losses[t]))) is not None
    ]
    assert got == [e for e in expected if e.step >= 200] and len(got) == 1
    assert resumed.metrics() == whole.metrics()


def test_anticipation_after_spike_then_back():
    controller = AnticipationController(_cfg(anticipatory_steps_after_spike=5))
    states = []
    transitions = []
    for step in range(20):
        if step == 8:
            controller.on_spike(resume_step=8)
        active, metrics = controller.update(step)
        states.append(active)
        if metrics:
            transitions.append((step, metrics["stability/anticipatory_routing"]))
    assert states == [False] * 8 + [True] * 5 + [False] * 7
    assert transitions == [(8, 1.0), (13, 0.0)]
    restored = AnticipationController(_cfg(anticipatory_steps_after_spike=5))
    restored.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert restored.update(20) == (False, None)


def test_anticipation_always_on_from_config():
    controller = AnticipationController(
        _cfg(anticipatory_routing=True, anticipation_delta=2)
    )
    assert controller.delta == 2
    assert all(controller.is_active(step) for step in range(50))


@pytest.mark.parametrize(
    "field, value",
    [
        ("spike_window", 1),
        ("min_history", 100),
        ("spike_threshold", -1.0),
        ("spike_ratio", 0.9),
        ("anticipation_delta", 0),
        ("max_rollbacks", -1),
        ("spike_detection", 1),
    ],
)
def test_bad_config_is_a_one_line_error(field, value):
    cfg = default_stability_config()
    cfg.spike_detection = True
    with cfg.ignore_type():
        cfg[field] = value
    with pytest.raises(ConfigError, match=rf"^config\.stability\.{field}: "):
        validate_stability_config(cfg)


def test_detection_needs_a_criterion():
    with pytest.raises(ConfigError, match="spike_threshold"):
        validate_stability_config(_cfg(spike_threshold=0.0, spike_ratio=0.0))


def test_reloading_an_older_state_on_rollback_keeps_the_cap():
    """The loop may reload the checkpoint's detector state on a rollback: counters must not reset."""
    losses = _curve(400)
    for t in (150, 250, 350):
        losses[t] *= 3
    detector = SpikeDetector(_cfg(max_rollbacks=1))
    saved = None
    rollbacks = []
    for t, loss in enumerate(losses):
        if t == 100:
            saved = json.loads(json.dumps(detector.state_dict()))
        event = detector.observe(t, float(loss))
        if event is not None and event.kind == "spike":
            rollbacks.append(event.rollback)
            detector.load_state_dict(saved)  # what a restore of step 100 brings back
            detector.rolled_back_to(100)
    assert rollbacks == [True, False, False]
    assert detector.metrics()["stability/spikes"] == 3.0
