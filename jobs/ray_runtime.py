"""Start an embedded local Ray, or join the cluster named by RAY_ADDRESS (as ``ray job submit`` sets it)."""

from __future__ import annotations

import logging
import os

import ray

LOCALHOST = "127.0.0.1"


def start_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connect to ``address`` (or $RAY_ADDRESS); without one, start a local Ray bound to 127.0.0.1.

    The embedded Ray is always a new one (``address="local"``): a cluster left running on the machine
    by ``ray start`` is joined only when asked for, never by accident with other resources.
    """
    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
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
