"""A model's health, judged from the outcomes of its batches.

Policy: a batch in which every item failed, at least one of them with a fault (see
`camserve.server.faults`), counts one; `failing_after` of them in a row turn the model failing
(grpc.health.v1 NOT_SERVING, ModelInfo.ready false, camserve_model_ready 0). Any batch with one
success resets the count and turns it serving again. Batches that only met refusals change
nothing: a request the engine refused says nothing about the model. While failing, the runtime
probes the model every `health_probe_s` with one image, so a model that load balancers no
longer send traffic to still comes back once it works.
"""

from __future__ import annotations

from collections.abc import Sequence

from camserve.server.faults import is_fault


class HealthTracker:
    """Counts batches that failed with a fault, in a row, and says when serving changes."""

    def __init__(self, failing_after: int) -> None:
        self._failing_after = failing_after
        self._faulted = 0  # batches in a row in which every item failed, with a fault
        self.serving = True

    def observe(self, outcomes: Sequence[object]) -> bool:
        """Records one batch's outcomes (results or exceptions); True when `serving` changed."""
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if len(failures) < len(outcomes):
            self._faulted = 0
        elif any(is_fault(f) for f in failures):
            self._faulted += 1
        serving = self._faulted < self._failing_after
        changed = serving != self.serving
        self.serving = serving
        return changed
