"""Fair to a shared machine: OpenMP threads that wait for work sleep (`OMP_WAIT_POLICY=PASSIVE`) instead of
spinning, so that a busy machine (other jobs, or trip's own Flower processes) costs wall time, not CPU time burnt
in a loop (docs/performance.md, "OpenMP threads spinning"). It changes no number. OpenMP reads the policy once,
when torch loads it: the CLI sets it before anything imports torch, and the Flower engines pass it to every
process they start; a policy the user set is kept."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SHARED_CORES_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def share_the_cores(env: MutableMapping[str, str] = os.environ) -> None:
    for name, value in SHARED_CORES_ENV.items():
        env.setdefault(name, value)
