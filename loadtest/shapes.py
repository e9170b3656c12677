"""Load shapes for the MARché load test: a staircase (`StepLoad`) and a burst (`Spike`).

Add this file next to the locustfile; the shape then drives users and duration, and Locust
ignores `-u/-r/-t` (with a warning):

    MARCHE_LT_SHAPE=step locust -f loadtest/locustfile.py,loadtest/shapes.py --headless \\
        --host http://127.0.0.1:8000 --stop-timeout 60

Locust runs the first shape class it finds, so only the one named by `MARCHE_LT_SHAPE`
(`step`, the default, or `spike`) is concrete; the other is marked abstract. In the web UI with
`--class-picker`, the selected shape is the one offered.

StepLoad (env):  MARCHE_LT_STEP_USERS=4 users added per stage, MARCHE_LT_STEP_STAGES=4 stages,
                 MARCHE_LT_STEP_SECONDS=30 per stage, MARCHE_LT_STEP_RATE=2 users/s spawn rate.
                 4 -> 8 -> 12 -> 16 users over 2 minutes by default, then stop.
Spike (env):     MARCHE_LT_SPIKE_BASE=2 users before and after, MARCHE_LT_SPIKE_USERS=16 users at
                 the peak, MARCHE_LT_SPIKE_RATE=16 users/s into the spike, and the phase lengths
                 MARCHE_LT_SPIKE_WARM=30, MARCHE_LT_SPIKE_HOLD=20, MARCHE_LT_SPIKE_RECOVER=30 s.
                 Watch the shed row (`generate [shed]`) and queue metrics during the peak, and
                 that latency comes back down in the recovery phase.
"""

from __future__ import annotations

import os

from locust import LoadTestShape

SELECTED = os.environ.get("MARCHE_LT_SHAPE", "step").strip().lower()
if SELECTED not in ("step", "spike"):
    raise ValueError(f"MARCHE_LT_SHAPE must be 'step' or 'spike', not {SELECTED!r}")


def _env(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


class StepLoad(LoadTestShape):
    """`users` more users every `seconds`, for `stages` stages, then stop."""

    abstract = SELECTED != "step"

    def __init__(self) -> None:
        super().__init__()
        self.users = int(_env("MARCHE_LT_STEP_USERS", 4))
        self.stages = int(_env("MARCHE_LT_STEP_STAGES", 4))
        self.seconds = _env("MARCHE_LT_STEP_SECONDS", 30)
        self.rate = _env("MARCHE_LT_STEP_RATE", 2)

    def at(self, t: float) -> tuple[int, float] | None:
        stage = int(t // self.seconds)
        if stage >= self.stages:
            return None
        return (stage + 1) * self.users, self.rate

    def tick(self) -> tuple[int, float] | None:
        return self.at(self.get_run_time())


class Spike(LoadTestShape):
    """`base` users, a sudden jump to `peak`, back to `base`, then stop."""

    abstract = SELECTED != "spike"

    def __init__(self) -> None:
        super().__init__()
        self.base = int(_env("MARCHE_LT_SPIKE_BASE", 2))
        self.peak = int(_env("MARCHE_LT_SPIKE_USERS", 16))
        self.rate = _env("MARCHE_LT_SPIKE_RATE", 16)
        self.warm = _env("MARCHE_LT_SPIKE_WARM", 30)
        self.hold = _env("MARCHE_LT_SPIKE_HOLD", 20)
        self.recover = _env("MARCHE_LT_SPIKE_RECOVER", 30)

    def at(self, t: float) -> tuple[int, float] | None:
        if t < self.warm:
            return self.base, self.base  # ramp the baseline in about a second
        if t < self.warm + self.hold:
            return self.peak, self.rate
        if t < self.warm + self.hold + self.recover:
            return self.base, self.rate  # drop users as fast as they came
        return None

    def tick(self) -> tuple[int, float] | None:
        return self.at(self.get_run_time())
