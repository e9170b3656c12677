"""Autoscaling the engine deployment on work, not request counts (Ray Serve 2.60's custom
autoscaling policy API).

Each engine replica reports, through `record_autoscaling_stats`, the seconds of engine time its
queued and running work needs (`wait_s` = step_s × ceil(image_steps / rows), the formula of
`service.core.queue`) and how many requests that is. Serve averages each over
`look_back_period_s`; this policy asks for

    replicas = (Σ_r wait_s(r) + queued_at_handles × wait per request) / target_wait_s

so each replica holds about `target_wait_s` seconds of work: a 16-image 256-step request counts
256× a 1-image 16-step one. Serve then applies `upscale_delay_s` / `downscale_delay_s`, rounds
up and clamps to `min_replicas` / `max_replicas`.

It runs inside Serve's controller, every control-loop tick: standard library only, no torch,
nothing that imports the engine (the controller has no `runtime_env` of the app).
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger("ray.serve")  # the controller's log: one line per changed decision
POLICY_PATH = "service.ray_serve.autoscaling:WorkPolicy"


class WorkPolicy:
    def __init__(self, target_wait_s: float = 10.0) -> None:
        if target_wait_s <= 0:
            raise ValueError("target_wait_s must be positive")
        self.target_wait_s = target_wait_s

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        metrics = ctx.aggregated_metrics or {}
        waits, requests = metrics.get("wait_s") or {}, metrics.get("requests") or {}
        if not waits:  # no report yet (replicas starting): hold the current target
            return ctx.target_num_replicas, state
        wait = sum(waits.values())
        queued = float(ctx.total_queued_requests or 0)  # waiting at handles, past every replica
        if queued:
            per_request = wait / sum(requests.values()) if sum(requests.values()) else 0.0
            wait += queued * per_request
        desired = wait / self.target_wait_s
        if math.ceil(desired) != state.get("decision"):
            log.info("WorkPolicy: %.1f s of work on %d replicas (+%g queued at handles): %d",
                     wait, len(waits), queued, math.ceil(desired))  # fmt: skip
        state.update(work_s=round(wait, 3), desired=round(desired, 3), decision=math.ceil(desired))
        return desired, state
