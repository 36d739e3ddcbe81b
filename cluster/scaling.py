"""Asking the cluster for the nodes a run needs before planning on them.

An autoscaling cluster (``ray_cluster.yaml``: GPU workers with ``min_workers: 0``) starts with its head
alone; nothing launches a GPU worker until some demand asks for one. The plan (``cluster.resources``) is
made from the nodes alive when it is made, so the run first asks the autoscaler for its extractors'
bundles with Ray's own ``request_resources`` — the call the autoscaler documents for "scale to fit
these shapes now" — waits, bounded and logged, until the alive nodes can hold them, and only then
plans. The request is withdrawn once the actors hold their resources, so the cluster can shrink when
the run ends; a node lost later is replaced by the autoscaler from the restarted actors' own demand.

Only a run that joined a cluster waits (``wait_s > 0``): an embedded local Ray can never gain a node.
jobs.train asks for its training bundles the same way (``wait_for_bundles``), and on an embedded Ray
refuses at once what no node can hold (its tasks would otherwise wait forever).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import ray
from ray.autoscaler.sdk import request_resources

from anomaly_core.config import ConfigError
from cluster.resources import Node, alive_nodes

log = logging.getLogger("cluster.scaling")

POLL_S = 1.0
LOG_EVERY_S = 30.0


def extractor_bundles(cluster: Any) -> list[dict[str, float]]:
    """The resource shapes the run's extractors need: one bundle per extractor.

    ``num_extractors: auto`` needs at least one (more are used when the cluster has them); with
    ``gpus_per_extractor > 0`` each bundle holds its GPU share, so the autoscaler starts a GPU worker.
    """
    count = 1 if cluster.num_extractors == "auto" else cluster.num_extractors
    bundle = {"CPU": float(cluster.cpus_per_actor)}
    if cluster.gpus_per_extractor > 0:
        bundle["GPU"] = float(cluster.gpus_per_extractor)
    return [dict(bundle) for _ in range(count)]


def place(bundles: Sequence[dict[str, float]], nodes: Sequence[Node]) -> list[str] | None:
    """The node id of each of ``bundles`` (in their order) when all can be placed on ``nodes``, else None.

    First fit, largest GPU share first: the same packing rule as the plan's, each node holding as many
    bundles as its CPUs and GPUs allow.
    """
    room = {node.node_id: [node.cpus, node.gpus] for node in nodes}
    homes: dict[int, str] = {}
    order = sorted(range(len(bundles)), key=lambda i: (-bundles[i].get("GPU", 0.0), -bundles[i].get("CPU", 0.0)))
    for index in order:
        cpu, gpu = bundles[index].get("CPU", 0.0), bundles[index].get("GPU", 0.0)
        for node_id, free in room.items():
            if free[0] + 1e-9 >= cpu and free[1] + 1e-9 >= gpu:
                free[0] -= cpu
                free[1] -= gpu
                homes[index] = node_id
                break
        else:
            return None
    return [homes[index] for index in range(len(bundles))]


def fits(bundles: Sequence[dict[str, float]], nodes: Sequence[Node]) -> bool:
    """Whether ``bundles`` can all be placed on ``nodes`` (``place``)."""
    return place(bundles, nodes) is not None


def _offer(nodes: Sequence[Node]) -> str:
    return ", ".join(f"{node.cpus:g} CPU/{node.gpus:g} GPU" for node in nodes) or "no node"


def _shapes(bundles: Sequence[dict[str, float]]) -> str:
    counts: dict[str, int] = {}
    for bundle in bundles:
        shape = "{" + ", ".join(f"{key}: {value:g}" for key, value in sorted(bundle.items())) + "}"
        counts[shape] = counts.get(shape, 0) + 1
    return " + ".join(f"{count} x {shape}" for shape, count in counts.items())


def acquire_nodes(cluster: Any, wait_s: float, **probes: Any) -> list[Node]:
    """The alive nodes, once they can hold the run's extractor bundles (``extractor_bundles``).

    With ``wait_s == 0`` (an embedded Ray) the nodes as they are: the plan then refuses what cannot fit,
    or runs GPU extractors on CPUs. Otherwise ``wait_for_bundles`` (``probes``: its ``nodes_now``,
    ``request``, ``clock`` and ``sleep``, which tests replace).
    """
    if wait_s <= 0:
        return probes.get("nodes_now", _alive)()
    bundles = extractor_bundles(cluster)
    gpus = " and cluster.gpus_per_extractor" if any("GPU" in bundle for bundle in bundles) else ""
    return wait_for_bundles(bundles, "the extractors' bundles", f"cluster.num_extractors, cluster.cpus_per_actor{gpus}",
                            wait_s, **probes)


def _alive() -> list[Node]:
    return alive_nodes(ray.nodes())


def wait_for_bundles(
    bundles: Sequence[dict[str, float]],
    what: str,
    keys: str,
    wait_s: float,
    nodes_now: Callable[[], list[Node]] = _alive,
    request: Callable[..., None] = request_resources,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Node]:
    """The alive nodes, once they can hold ``bundles`` (``what`` they are, for the log; ``keys``: the config
    keys that ask for them, named in the error).

    If they fit now, at once. With ``wait_s == 0`` (an embedded Ray, which never gains a node) a refusal
    at once, naming ``keys`` and what the nodes offer. Otherwise asks the autoscaler for the bundles and
    polls until they fit, logging what it waits for every ``LOG_EVERY_S``; after ``wait_s`` seconds it
    fails with one line naming what never arrived and ``keys``.
    """
    nodes = nodes_now()
    if fits(bundles, nodes):
        return nodes
    if wait_s <= 0:
        raise ConfigError(f"no node of this Ray can hold {_shapes(bundles)} ({what}): it has {_offer(nodes)}; "
                          f"lower {keys}")
    request(bundles=list(bundles))
    log.info("asked the autoscaler for %s (%s); the cluster now offers %s; waiting up to %.0f s "
             "(cluster.resource_wait_s)", _shapes(bundles), what, _offer(nodes), wait_s)
    started = clock()
    logged = started
    while not fits(bundles, nodes):
        now = clock()
        if now - started >= wait_s:
            request(bundles=[])
            raise ConfigError(
                f"the cluster did not offer {_shapes(bundles)} within cluster.resource_wait_s={wait_s:g} s: it has "
                f"{_offer(nodes)}; check that ray_cluster.yaml has a worker type with these resources and room under "
                f"max_workers, or lower {keys}"
            )
        if now - logged >= LOG_EVERY_S:
            log.info("still waiting %.0f s for %s; the cluster offers %s", now - started, _shapes(bundles), _offer(nodes))
            logged = now
        sleep(POLL_S)
        nodes = nodes_now()
    log.info("the cluster offers %s after %.1f s", _offer(nodes), clock() - started)
    return nodes


def withdraw_request() -> None:
    """Clear this job's standing request, so the autoscaler may shrink the cluster once the run's actors exit."""
    request_resources(bundles=[])

