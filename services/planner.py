"""The Planner deployment: the cluster view that turns occupancy and device costs into a cost context.

Verifier replicas report ``(replica id, device kind, live sessions, last batch
size)`` every few tens of milliseconds. Cost profiles are held per device kind
(``resolve_profile``: the measured one for (device, target, drafter, dtype), or
the synthetic affine profile, with a warning, where none was measured; or one configured file for
every device). A drafter asks ``plan(verifier replica, drafter device,
drafter batch, context)`` and gets the ``CostContext`` its CastPolicy reads::

    B_v        = live sessions on that verifier replica (every row rides in its forward)
    target[k]  = f_T^(verifier device)(B_v, ctx, k) / f_T^(verifier device)(B_v, ctx, 1)
    drafter[k] = f_D^(drafter device)(B_d, ctx, k)  / f_T^(verifier device)(B_v, ctx, 1)
    drafter_alone[k] = f_D^(drafter device)(1, ctx, k) / f_T^(verifier device)(B_v, ctx, 1)   (a prompt fed apart)

An unknown or silent verifier replica (no report for ``STALE_AFTER_S``) is
planned as the busiest live replica (or, with none, at ``B = 1`` on the
drafter's device kind).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cast_core.cost import CostProfile, resolve_profile
from cast_core.policy import CostContext, make_policy
from services.config import AppConfig

logger = logging.getLogger(__name__)

STALE_AFTER_S = 10.0


@dataclass
class VerifierView:
    """Last report of one verifier replica."""

    device: str
    sessions: int
    last_batch_size: int
    reported_at: float


class PlannerReplica:
    """The single planner replica (deployed as ``Planner``)."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self._horizon = make_policy(config.policy, config.static, config.cast).cost_horizon
        self._verifiers: dict[str, VerifierView] = {}
        self._profiles: dict[str, CostProfile] = {}
        self._fixed = CostProfile.load(config.cost_profile) if config.cost_profile else None

    def report(self, replica_id: str, device: str, sessions: int, last_batch_size: int) -> None:
        """A verifier replica's current occupancy."""
        self._verifiers[replica_id] = VerifierView(device, sessions, last_batch_size, time.monotonic())

    def profile(self, device: str) -> CostProfile:
        """Cost profile of a device kind (looked up once, then kept)."""
        if self._fixed is not None:
            return self._fixed
        if device not in self._profiles:
            target, drafter = Path(self.config.target).name, self.config.drafter_profile_key(device)
            self._profiles[device] = resolve_profile(device, target, drafter, self.config.dtype_on(device))
        return self._profiles[device]

    def _live(self) -> dict[str, VerifierView]:
        now = time.monotonic()
        return {rid: v for rid, v in self._verifiers.items() if now - v.reported_at <= STALE_AFTER_S}

    def plan(self, verifier_replica: str | None, drafter_device: str, drafter_batch: int, context: int) -> CostContext:
        """Cost context for one draft step that ``verifier_replica`` will verify (see module docstring)."""
        live = self._live()
        view = live.get(verifier_replica or "")
        if view is None:
            busiest = max(live.values(), key=lambda v: v.sessions, default=None)
            view = busiest or VerifierView(drafter_device, 1, 0, time.monotonic())
        b_v, b_d = max(1, view.sessions), max(1, drafter_batch)
        target = np.asarray(self.profile(view.device).latency_curve("target", b_v, context, self._horizon), dtype=np.float64)
        drafter = np.asarray(self.profile(drafter_device).latency_curve("drafter", b_d, context, self._horizon), dtype=np.float64)
        alone = np.asarray(self.profile(drafter_device).latency_curve("drafter", 1, context, self._horizon), dtype=np.float64)
        step = target[1]
        step_s = self.profile(view.device).plain_step_seconds(step)
        return CostContext(drafter=drafter / step, target=target / step, batch_size=b_v, context=context, step_s=step_s, drafter_alone=alone / step)

    def cluster(self) -> dict[str, dict[str, object]]:
        """The current view: live verifier replicas and their occupancy."""
        return {
            rid: {"device": v.device, "sessions": v.sessions, "last_batch_size": v.last_batch_size}
            for rid, v in self._live().items()
        }
