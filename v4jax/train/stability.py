"""Training-stability logic ([PAPER] §4.2.3, spec §8.4): loss-spike detection and anticipatory routing.

Pure Python/numpy, no jax: the training loop feeds each step's loss to `SpikeDetector.observe` and
acts on the returned `Event`:

* "nonfinite": the loss is NaN/Inf; skip this step's update (when `skip_nonfinite`), it is counted.
* "spike": the loss jumped (z-score over the rolling window above `spike_threshold`, and/or above
  `spike_ratio` x the rolling median); roll back to the last good checkpoint (at most
  `max_rollbacks` times) and switch anticipatory routing on for `anticipatory_steps_after_spike`
  steps (`AnticipationController.on_spike`), after which training reverts to standard routing.

Both objects have `state_dict()` / `load_state_dict()` with plain JSON-able values so they survive
checkpoint and resume. Every event and every routing transition carries a `metrics()` dict.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import ml_collections
import numpy as np

from v4jax.model.config import ConfigError

log = logging.getLogger(__name__)


def default_stability_config() -> ml_collections.ConfigDict:
    """Defaults for `config.stability` (detection off; anticipatory routing off)."""
    c = ml_collections.ConfigDict()
    c.anticipatory_routing = (
        False  # always on (otherwise only for a while after a spike)
    )
    c.anticipation_delta = (
        1  # routing indices come from the params of this many steps earlier
    )
    c.spike_detection = False
    c.spike_window = 50  # rolling window of good losses
    c.spike_threshold = 4.0  # z-score above the window's mean; 0 = off
    c.spike_ratio = 0.0  # loss > ratio x the window's median; 0 = off (e.g. 1.5)
    c.min_history = 20  # no spike verdicts before this many good losses
    c.anticipatory_steps_after_spike = 100
    c.max_rollbacks = 3  # afterwards spikes are only logged
    c.skip_nonfinite = True
    return c


def _fail(field: str, message: str) -> None:
    raise ConfigError(f"config.stability.{field}: {message}")


def validate_stability_config(cfg: ml_collections.ConfigDict) -> None:
    """Raise a one-line `ConfigError` naming `config.stability.<field>` for the first bad value."""
    known = set(default_stability_config().keys())
    for key in cfg:
        if key not in known:
            _fail(key, f"unknown field (known: {', '.join(sorted(known))})")
    for key in sorted(known):
        if key not in cfg:
            _fail(key, "missing (start from default_stability_config())")
    for key in ("anticipatory_routing", "spike_detection", "skip_nonfinite"):
        if not isinstance(cfg[key], bool):
            _fail(key, f"must be True or False, got {cfg[key]!r}")
    for key, minimum in (
        ("anticipation_delta", 1),
        ("spike_window", 2),
        ("min_history", 2),
        ("anticipatory_steps_after_spike", 0),
        ("max_rollbacks", 0),
    ):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            _fail(key, f"must be an integer >= {minimum}, got {value!r}")
    for key in ("spike_threshold", "spike_ratio"):
        value = cfg[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            _fail(key, f"must be a finite number >= 0 (0 = off), got {value!r}")
    if 0 < cfg.spike_ratio <= 1:
        _fail(
            "spike_ratio",
            f"must be > 1 (a multiple of the rolling median) or 0, got {cfg.spike_ratio!r}",
        )
    if cfg.min_history > cfg.spike_window:
        _fail(
            "min_history",
            f"{cfg.min_history} must be <= spike_window ({cfg.spike_window})",
        )
    if cfg.spike_detection and cfg.spike_threshold == 0 and cfg.spike_ratio == 0:
        _fail(
            "spike_threshold",
            "spike_detection needs spike_threshold > 0 or spike_ratio > 0",
        )


@dataclasses.dataclass(frozen=True)
class Event:
    """Something the loop must act on. kind: "nonfinite" | "spike"."""

    kind: str
    step: int
    loss: float
    skip_update: bool = False  # nonfinite: do not apply this step's update
    rollback: bool = False  # spike: restore the last good checkpoint
    zscore: float = float("nan")
    median: float = float("nan")

    def metrics(self) -> dict[str, float]:
        """Scalars for the metrics writer (prefix "stability/")."""
        out = {f"stability/{self.kind}": 1.0, "stability/event_loss": self.loss}
        if self.kind == "spike":
            out.update(
                {
                    "stability/spike_zscore": self.zscore,
                    "stability/spike_median": self.median,
                    "stability/rollback": float(self.rollback),
                }
            )
        else:
            out["stability/skipped_update"] = float(self.skip_update)
        return out


class SpikeDetector:
    """Rolling statistics over the last `spike_window` good losses; `observe` returns an `Event` or None."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        validate_stability_config(cfg)
        self.cfg = cfg
        self.history: list[
            tuple[int, float]
        ] = []  # (step, loss) of good steps, oldest first
        self.nonfinite_count = 0
        self.spike_count = 0
        self.rollback_count = 0

    def observe(self, step: int, loss: float) -> Event | None:
        """Judge this step's loss. Good losses enter the window; nonfinite and spiking ones do not."""
        loss = float(loss)
        if not math.isfinite(loss):
            self.nonfinite_count += 1
            event = Event(
                "nonfinite", int(step), loss, skip_update=bool(self.cfg.skip_nonfinite)
            )
            log.warning(
                "step %d: non-finite loss %s (skip_update=%s, total %d)",
                step,
                loss,
                event.skip_update,
                self.nonfinite_count,
            )
            return event
        event = self._judge(int(step), loss) if self.cfg.spike_detection else None
        if event is None:
            self.history.append((int(step), loss))
            del self.history[: max(0, len(self.history) - self.cfg.spike_window)]
        return event

    def _judge(self, step: int, loss: float) -> Event | None:
        if len(self.history) < self.cfg.min_history:
            return None
        losses = np.asarray([value for _, value in self.history], dtype=np.float64)
        mean, median = float(losses.mean()), float(np.median(losses))
        std = max(
            float(losses.std()), 1e-6 * max(abs(mean), 1.0)
        )  # a flat window must not divide by 0
        zscore = (loss - mean) / std
        by_z = self.cfg.spike_threshold > 0 and zscore > self.cfg.spike_threshold
        by_ratio = self.cfg.spike_ratio > 0 and loss > self.cfg.spike_ratio * median
        if not (by_z or by_ratio):
            return None
        self.spike_count += 1
        rollback = self.rollback_count < self.cfg.max_rollbacks
        self.rollback_count += int(rollback)
        log.warning(
            "step %d: loss spike %.4g (z=%.2f, median %.4g); rollback=%s (%d/%d)",
            step,
            loss,
            zscore,
            median,
            rollback,
            self.rollback_count,
            self.cfg.max_rollbacks,
        )
        return Event(
            "spike", step, loss, rollback=rollback, zscore=zscore, median=median
        )

    def rolled_back_to(self, step: int) -> None:
        """After restoring the checkpoint of `step`, forget losses of later steps (they will be replayed)."""
        self.history = [(s, value) for s, value in self.history if s <= step]

    def metrics(self) -> dict[str, float]:
        """Running counters for the metrics writer."""
        return {
            "stability/nonfinite_steps": float(self.nonfinite_count),
            "stability/spikes": float(self.spike_count),
            "stability/rollbacks": float(self.rollback_count),
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state (store it with the checkpoint)."""
        return {
            "history_steps": [s for s, _ in self.history],
            "history_losses": [v for _, v in self.history],
            "nonfinite_count": self.nonfinite_count,
            "spike_count": self.spike_count,
            "rollback_count": self.rollback_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned.

        The counters only grow, so they keep the larger of the stored and the in-memory value:
        reloading an older checkpoint's state on a rollback must not reset the rollback count
        (and with it the `max_rollbacks` cap), while a fresh process simply takes the stored one.
        """
        steps, losses = list(state["history_steps"]), list(state["history_losses"])
        if len(steps) != len(losses):
            raise ValueError(
                "stability state: history_steps and history_losses differ in length"
            )
        self.history = [(int(s), float(v)) for s, v in zip(steps, losses)][
            -self.cfg.spike_window :
        ]
        self.nonfinite_count = max(self.nonfinite_count, int(state["nonfinite_count"]))
        self.spike_count = max(self.spike_count, int(state["spike_count"]))
        self.rollback_count = max(self.rollback_count, int(state["rollback_count"]))


class AnticipationController:
    """Says per step whether anticipatory routing is on: always (config) or for a while after a spike."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        validate_stability_config(cfg)
        self.cfg = cfg
        self.active_until = (
            -1
        )  # anticipatory routing on for steps < active_until (after a spike)
        self.last_state: bool | None = None
        self.transitions: list[tuple[int, bool]] = []  # (step, now_on), for logs

    @property
    def delta(self) -> int:
        """Δt: routing for step t is computed with the params of step t - delta."""
        return int(self.cfg.anticipation_delta)

    def on_spike(self, resume_step: int) -> None:
        """Keep anticipatory routing on for `anticipatory_steps_after_spike` steps from `resume_step`."""
        self.active_until = max(
            self.active_until,
            int(resume_step) + self.cfg.anticipatory_steps_after_spike,
        )

    def is_active(self, step: int) -> bool:
        """Whether step `step` uses anticipatory routing (pure; no logging)."""
        return bool(self.cfg.anticipatory_routing) or int(step) < self.active_until

    def update(self, step: int) -> tuple[bool, dict[str, float] | None]:
        """`(active, metrics or None)` for `step`; metrics are returned (and logged) on a transition."""
        active = self.is_active(step)
        if active == self.last_state:
            return active, None
        first = self.last_state is None
        self.last_state = active
        if first and not active:
            return active, None  # starting in standard routing is not a transition
        self.transitions.append((int(step), active))
        log.info("step %d: anticipatory routing %s", step, "on" if active else "off")
        return active, {"stability/anticipatory_routing": float(active)}

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state (store it with the checkpoint)."""
        return {
            "active_until": self.active_until,
            "last_state": None if self.last_state is None else bool(self.last_state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (a pending post-spike window is never shortened)."""
        self.active_until = max(self.active_until, int(state["active_until"]))
        self.last_state = (
            None if state["last_state"] is None else bool(state["last_state"])
        )
