"""Where an actor runs and what it computes on: planned node pinning, the math device of its GPU share, and
the thread counts its libraries use."""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from anomaly_core.distances import MatrixDevice
from anomaly_core.threads import thread_counts
from cluster.resources import Placement


def pinned(placement: Placement | None) -> dict[str, Any]:
    """Actor options for a planned placement: its reservation, on its node.

    Soft affinity: if the node is gone when Ray restarts the actor, it is placed elsewhere rather
    than left unschedulable.
    """
    if placement is None:
        return {"num_cpus": 0}
    return {
        "num_cpus": placement.cpus,
        "num_gpus": placement.gpus,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(placement.node_id, soft=True),
    }


def math_device() -> MatrixDevice:
    """The GPU of this actor's share when it has one torch can use, else the CPU (numpy/BLAS).

    torch is imported only where a GPU was reserved, so CPU holders start without it.
    """
    if ray.get_gpu_ids():
        import torch

        if torch.cuda.is_available():
            return MatrixDevice("cuda")
    return MatrixDevice("cpu")


class ReportsThreads:
    """Actors that can say which thread counts their libraries use (the plan's, checked in the tests)."""

    def thread_counts(self) -> dict:
        """The counts of this actor process's libraries now (``anomaly_core.threads.thread_counts``)."""
        return thread_counts()
