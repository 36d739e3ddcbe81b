"""Start an embedded local Ray, or join the cluster named by RAY_ADDRESS (as ``ray job submit`` sets it), and
give the driver its thread count."""

from __future__ import annotations

import logging
import os

import ray

from anomaly_core.threads import limit_threads

LOCALHOST = "127.0.0.1"
# The driver has no place in the resource plan: the plan gives every CPU of a node to its actors. Its own
# math is small or single-threaded by nature (greedy confirmations are row-wise, the two-round union is a
# few thousand points, an ensemble's normalisation and metrics are numpy reductions and sorts, the report
# draws figures), so library threads beyond one would only take cores from the actors beside it.
DRIVER_THREADS = 1


_joined = False  # whether start_ray connected to a running cluster (which may grow) rather than starting one


def resource_wait_s(cluster) -> float:
    """How long a run waits for the nodes it asks for (``cluster.resource_wait_s``) once start_ray joined a
    cluster by address; 0 otherwise: an embedded (or caller-started) Ray gains no nodes by waiting."""
    return cluster.resource_wait_s if _joined else 0.0


def start_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connect to ``address`` (or $RAY_ADDRESS); without one, start a local Ray bound to 127.0.0.1.

    The embedded Ray is always a new one (``address="local"``): a cluster left running on the machine
    by ``ray start`` is joined only when asked for, never by accident with other resources. A process that
    connected to Ray before (a test session, a notebook) keeps its own thread counts.
    """
    if ray.is_initialized():
        return "existing"
    limit_threads(DRIVER_THREADS)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        global _joined
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        _joined = True
        return f"joined {address}"
    ray.init(
        address="local",
        _node_ip_address=LOCALHOST,
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    return "embedded local Ray on 127.0.0.1"
