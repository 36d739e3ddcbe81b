"""The resource plan: which actor runs on which node, what it reserves there, and how many threads it uses.

The rule (also in the README, "Resources"):

1. The plan is made from the Ray nodes alive at start, in node-id order; a run that joined a cluster first
   asks its autoscaler for the extractors' bundles and waits for them (``cluster.scaling``).
2. **Extractors** hold the backbone. With GPUs and ``gpus_per_extractor > 0`` each GPU takes one
   (``num_extractors: auto``); without GPUs each node takes ``floor(CPUs / max(cpus_per_actor, 2))``,
   at least one in the cluster. An explicit count is dealt round robin over the nodes within their
   room (``GPUs / gpus_per_extractor`` per node: 0.25 packs four on a GPU) and refused beyond it,
   naming the keys. Each
   reserves ``cpus_per_actor`` CPUs (+ its GPU share) and always runs ``int(cpus_per_actor)`` torch
   threads: CPU convolutions round differently with other thread counts, and banks must be
   bit-identical for any number of extractors.
3. **Math actors** — coreset holders (``coreset_shards``) and evaluators (``num_evaluators``; auto:
   one per extractor up to 4, or one per 4 cores of the math nodes up to 8 if that is more, since
   evaluators also compute their categories' metrics) — are dealt round robin over the GPU nodes
   (over all nodes where there are none). On each node they split
   evenly what the extractors leave: the CPUs, and the GPUs (at most one each). A math actor with a
   GPU share runs its products on the GPU; without one, on the CPU.
   **Colocated** (``colocate``; auto: where extractors have a GPU share): no holders are started; each
   extractor also holds the features it made for the coreset and scores its test shards, so features
   never leave the process (the GPU) that made them, and the evaluators only compute metrics (no GPU share).
4. **Threads of a math actor**: ``coreset_threads`` / ``eval_threads`` when set. Otherwise its CPU share
   while the node's extractors still have images queued, and the node's cores split among the math
   actors working there once they have none. Their results never depend on thread counts (every
   value is recomputed row-wise), so only the extractors' count is fixed.
5. **Decode threads of an extractor**: ``decode_workers`` when set (each extractor reserves
   ``cpus_per_actor``); ``auto`` with a GPU share: the node's cores not held by other actors — every math
   actor on the node keeps one CPU (its products run on the GPU), the node's extractors split the rest and
   reserve it, and decode on that many threads (at least ``cpus_per_actor``): one decode thread per GPU
   starved it. ``auto`` on CPUs: 1 (the torch threads already use the extractor's cores).

Actors are pinned to their planned node (``NodeAffinitySchedulingStrategy``), so the reservations on a
node add up to at most what it has; the plan and the threads used go into ``summary.json``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from anomaly_core.config import ConfigError

ROLES = ("extractor", "holder", "evaluator")


@dataclass(frozen=True)
class Node:
    node_id: str
    cpus: float
    gpus: float


@dataclass(frozen=True)
class Placement:
    role: str
    slot: int  # position among the actors of its role
    node_id: str
    cpus: float  # reserved logical CPUs
    gpus: float  # reserved GPU share


@dataclass(frozen=True)
class ResourcePlan:
    nodes: tuple[Node, ...]
    extractors: tuple[Placement, ...]
    holders: tuple[Placement, ...]
    evaluators: tuple[Placement, ...]
    extractor_threads: int
    coreset_threads: int | None  # explicit, else None (auto)
    eval_threads: int | None
    decode_workers: tuple[int, ...] = ()  # image-decoding threads of each extractor, by slot
    warnings: tuple[str, ...] = field(default=())
    colocate: bool = False  # extractors also hold their features for the coreset and score them (no holders)

    def node(self, node_id: str) -> Node:
        return next(node for node in self.nodes if node.node_id == node_id)

    def math_threads(self, placement: Placement, extracting: bool, active_on_node: int) -> int:
        """Threads for a holder or evaluator call, given whether its node's extractors still have
        images queued and how many math actors (this one included) work on its node now."""
        explicit = self.coreset_threads if placement.role == "holder" else self.eval_threads
        if explicit is not None:
            return explicit
        if extracting:
            return max(1, math.floor(placement.cpus + 1e-9))
        return max(1, int(self.node(placement.node_id).cpus) // max(1, active_on_node))

    def summary(self) -> dict[str, Any]:
        return {
            "nodes": [asdict(node) for node in self.nodes],
            "actors": [asdict(p) for p in (*self.extractors, *self.holders, *self.evaluators)],
            "extractor_threads": self.extractor_threads,
            "coreset_threads": self.coreset_threads or "auto",
            "eval_threads": self.eval_threads or "auto",
            "decode_workers": list(self.decode_workers),
            "colocate": self.colocate,
            "warnings": list(self.warnings),
        }


def alive_nodes(ray_nodes: Iterable[dict]) -> list[Node]:
    """``ray.nodes()`` entries -> the alive nodes with their CPU and GPU counts, in node-id order."""
    found = [
        Node(entry["NodeID"], float(entry["Resources"].get("CPU", 0.0)), float(entry["Resources"].get("GPU", 0.0)))
        for entry in ray_nodes
        if entry.get("Alive")
    ]
    return sorted(found, key=lambda node: node.node_id)


def _share(value: float) -> float:
    """Round a reservation down to Ray's resource resolution (1e-4), so shares never overflow a node."""
    return math.floor(value * 1e4) / 1e4


def plan_resources(cluster: Any, nodes: list[Node], coreset: bool = True) -> ResourcePlan:
    """The plan for ``cluster`` (the config's ``cluster`` block) on ``nodes``; refuses what cannot fit.
    ``coreset``: whether the method selects a coreset (PaDiM does not: no holders are planned)."""
    if not nodes:
        raise ConfigError("the Ray cluster has no alive node")
    warnings: list[str] = []
    use_gpu = cluster.gpus_per_extractor > 0 and any(node.gpus > 0 for node in nodes)
    if cluster.gpus_per_extractor > 0 and not use_gpu:
        warnings.append("cluster.gpus_per_extractor > 0 but the cluster has no GPU: extractors run on CPUs")
    cpus_each = cluster.cpus_per_actor
    gpus_each = cluster.gpus_per_extractor if use_gpu else 0.0

    def capacity(node: Node, auto: bool) -> int:
        by_cpu = math.floor(node.cpus / (max(cpus_each, 2.0) if auto and not use_gpu else cpus_each) + 1e-9)
        if not use_gpu:
            return by_cpu
        per_gpu = max(gpus_each, 1.0) if auto else gpus_each
        return min(by_cpu, math.floor(node.gpus / per_gpu + 1e-9))

    auto = cluster.num_extractors == "auto"
    room = {node.node_id: capacity(node, auto) for node in nodes}
    if auto:
        wanted = max(1, sum(room.values()))
        if sum(room.values()) == 0:  # no node has max(cpus_per_actor, 2) CPUs: one extractor if it fits at all
            room = {node.node_id: capacity(node, False) for node in nodes}
    else:
        wanted = cluster.num_extractors
    if sum(room.values()) < wanted:
        offer = ", ".join(f"{node.cpus:g} CPU/{node.gpus:g} GPU" for node in nodes)
        need = f"{cpus_each:g} CPU" + (f" + {gpus_each:g} GPU" if use_gpu else "")
        raise ConfigError(
            f"cluster.num_extractors={wanted} cannot be placed: each extractor needs {need} "
            f"(cluster.cpus_per_actor, cluster.gpus_per_extractor) and the nodes offer {offer} "
            f"(room for {sum(room.values())}); lower cluster.num_extractors or cluster.cpus_per_actor"
        )
    extractor_nodes: list[str] = []
    while len(extractor_nodes) < wanted:  # round robin within each node's room
        for node in nodes:
            if len(extractor_nodes) < wanted and extractor_nodes.count(node.node_id) < room[node.node_id]:
                extractor_nodes.append(node.node_id)
    # GPU nodes when there are any; else the nodes with CPUs (a head started with 0 CPUs, as ray_cluster.yaml's, takes none)
    math_nodes = [node for node in nodes if node.gpus > 0] or [node for node in nodes if node.cpus > 0] or nodes
    colocate = use_gpu if cluster.colocate == "auto" else cluster.colocate
    # Colocated: the extractors hold their own features; without a coreset nothing needs holding.
    n_holders = 0 if colocate or not coreset else cluster.coreset_shards
    # Evaluators also compute their categories' metrics (a CPU sort over every test pixel): enough of
    # them that a full benchmark's metrics run side by side, one per 4 cores of the math nodes, <= 8.
    math_cores = sum(node.cpus for node in math_nodes)
    n_evaluators = (cluster.num_evaluators if cluster.num_evaluators != "auto"
                    else max(1, min(4, len(extractor_nodes)), min(8, int(math_cores // 4))))
    roles = ["holder"] * n_holders + ["evaluator"] * n_evaluators
    homes = [math_nodes[i % len(math_nodes)].node_id for i in range(len(roles))]
    feed_gpus = use_gpu and cluster.decode_workers == "auto"

    def extractor_cpus(node_id: str) -> float:
        """An extractor's reservation: ``cpus_per_actor``, or with GPU decoding on auto the node's cores less
        one per math actor there, split among the node's extractors."""
        if not feed_gpus:
            return cpus_each
        node = next(node for node in nodes if node.node_id == node_id)
        left = (node.cpus - homes.count(node_id)) / extractor_nodes.count(node_id)
        return max(cpus_each, _share(left))

    extractors = tuple(Placement("extractor", i, n, extractor_cpus(n), gpus_each) for i, n in enumerate(extractor_nodes))
    placed: dict[str, list[Placement]] = {"holder": [], "evaluator": []}
    short_of_gpu = False
    for role, home in zip(roles, homes):
        node = next(node for node in nodes if node.node_id == home)
        sharing = homes.count(home)
        used_cpu = sum(p.cpus for p in extractors if p.node_id == home)
        used_gpu = sum(p.gpus for p in extractors if p.node_id == home)
        # Colocated evaluators only compute metrics (a CPU sort): the GPU stays with the extractors.
        gpu = 0.0 if colocate else _share(min(1.0, max(0.0, node.gpus - used_gpu) / sharing))
        short_of_gpu |= node.gpus > 0 and gpu == 0.0 and not colocate
        cpu = _share(max(0.0, node.cpus - used_cpu) / sharing)
        placed[role].append(Placement(role, len(placed[role]), home, cpu, gpu))
    if short_of_gpu:
        warnings.append("the extractors hold every GPU (cluster.gpus_per_extractor): coreset holders and "
                        "evaluators on those nodes do their math on the CPU; 0.5 leaves them half of each GPU")
    for name in ("coreset_threads", "eval_threads"):
        if getattr(cluster, name) != "auto" and getattr(cluster, name) > max(node.cpus for node in nodes):
            warnings.append(f"cluster.{name}={getattr(cluster, name)} exceeds every node's CPU count: "
                            "threads will compete for cores")
    return ResourcePlan(
        nodes=tuple(nodes),
        extractors=extractors,
        holders=tuple(placed["holder"]),
        evaluators=tuple(placed["evaluator"]),
        extractor_threads=max(1, int(cpus_each)),
        coreset_threads=None if cluster.coreset_threads == "auto" else cluster.coreset_threads,
        eval_threads=None if cluster.eval_threads == "auto" else cluster.eval_threads,
        decode_workers=tuple(cluster.decode_workers if cluster.decode_workers != "auto"
                             else max(1, math.floor(p.cpus + 1e-9)) if use_gpu else 1 for p in extractors),
        warnings=tuple(warnings),
        colocate=colocate,
    )
