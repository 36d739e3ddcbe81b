"""The resource plan: reservations add up per node, threads follow the documented rule, bad plans fail fast."""

from __future__ import annotations

from collections import defaultdict

import pytest

from anomaly_core.config import ConfigError, parse_config
from cluster.resources import Node, alive_nodes, plan_resources


def cluster(**values):
    config = parse_config({"datasets": [{"name": "d", "format": "folder", "root": "."}], "cluster": values}, "test")
    return config.cluster


def totals(plan):
    used = defaultdict(lambda: [0.0, 0.0])
    for p in (*plan.extractors, *plan.holders, *plan.evaluators):
        used[p.node_id][0] += p.cpus
        used[p.node_id][1] += p.gpus
    return used


def test_laptop_demo_plan_two_cores():
    """The demo on this 2-core machine: one extractor holds both cores; math actors share them in time."""
    plan = plan_resources(cluster(cpus_per_actor=2, coreset_shards=2), [Node("a", 2, 0)])
    assert len(plan.extractors) == 1 and plan.extractor_threads == 2
    assert len(plan.holders) == 2 and len(plan.evaluators) == 1
    assert all(p.cpus == 0 and p.gpus == 0 for p in (*plan.holders, *plan.evaluators))
    holder, evaluator = plan.holders[0], plan.evaluators[0]
    assert plan.math_threads(holder, extracting=True, active_on_node=2) == 1
    assert plan.math_threads(holder, extracting=False, active_on_node=2) == 1
    assert plan.math_threads(evaluator, extracting=False, active_on_node=1) == 2  # alone: every core
    assert plan.math_threads(evaluator, extracting=False, active_on_node=3) == 1


def test_gpu_nodes_split_each_gpu_and_the_cpus_left_over():
    nodes = [Node("head", 8, 0), Node("g1", 16, 1), Node("g2", 16, 1)]
    plan = plan_resources(cluster(gpus_per_extractor=0.5, cpus_per_actor=4, coreset_shards=4, num_evaluators=2,
                                  decode_workers=4, colocate=False), nodes)
    assert [p.node_id for p in plan.extractors] == ["g1", "g2"]
    assert {p.node_id for p in (*plan.holders, *plan.evaluators)} == {"g1", "g2"}  # math goes where GPUs are
    for node_id, (cpus, gpus) in totals(plan).items():
        node = plan.node(node_id)
        assert cpus <= node.cpus + 1e-9 and gpus <= node.gpus + 1e-9
        assert gpus == pytest.approx(1.0, abs=1e-3) and cpus == pytest.approx(16, abs=1e-3)  # nothing idle
    holder = plan.holders[0]
    assert holder.gpus == pytest.approx(0.5 / 3, abs=1e-4) and holder.cpus == pytest.approx(4.0, abs=1e-4)
    assert plan.math_threads(holder, extracting=True, active_on_node=3) == 4
    assert plan.math_threads(holder, extracting=False, active_on_node=2) == 8
    assert plan.warnings == ()


def test_whole_gpu_extractors_leave_math_on_the_cpu_with_a_warning():
    plan = plan_resources(cluster(gpus_per_extractor=1, cpus_per_actor=2, colocate=False), [Node("g", 8, 1)])
    assert plan.holders and all(p.gpus == 0 for p in plan.holders)
    assert any("0.5 leaves them half" in w for w in plan.warnings)


def test_auto_cpu_extractors_one_per_two_cores_and_explicit_counts_round_robin():
    plan = plan_resources(cluster(cpus_per_actor=1), [Node("a", 4, 0), Node("b", 2, 0)])
    assert sorted(p.node_id for p in plan.extractors) == ["a", "a", "b"]
    plan = plan_resources(cluster(num_extractors=3, cpus_per_actor=1), [Node("a", 4, 0), Node("b", 2, 0)])
    assert [p.node_id for p in plan.extractors] == ["a", "b", "a"]
    assert plan.extractor_threads == 1
    # one core only: still one extractor (reserving its single CPU)
    assert len(plan_resources(cluster(cpus_per_actor=1), [Node("a", 1, 0)]).extractors) == 1


def test_infeasible_plan_fails_at_once_naming_the_keys_and_the_offer():
    with pytest.raises(ConfigError) as error:
        plan_resources(cluster(num_extractors=2, cpus_per_actor=2), [Node("a", 2, 0)])
    message = str(error.value)
    assert "cluster.num_extractors=2" in message and "cluster.cpus_per_actor" in message
    assert "2 CPU/0 GPU" in message and "room for 1" in message
    with pytest.raises(ConfigError, match="room for 0"):
        plan_resources(cluster(cpus_per_actor=4), [Node("a", 2, 0)])


def test_explicit_threads_win_and_are_reported():
    plan = plan_resources(cluster(coreset_threads=3, eval_threads=5), [Node("a", 2, 0)])
    assert plan.math_threads(plan.holders[0], extracting=True, active_on_node=9) == 3
    assert plan.math_threads(plan.evaluators[0], extracting=False, active_on_node=1) == 5
    summary = plan.summary()
    assert summary["coreset_threads"] == 3 and summary["eval_threads"] == 5
    assert {a["role"] for a in summary["actors"]} == {"extractor", "holder", "evaluator"}
    assert any("exceeds every node's CPU count" in w for w in plan.warnings)


def test_alive_nodes_reads_ray_nodes():
    entries = [
        {"NodeID": "b", "Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}},
        {"NodeID": "a", "Alive": True, "Resources": {"CPU": 4.0}},
        {"NodeID": "c", "Alive": False, "Resources": {"CPU": 8.0}},
    ]
    assert alive_nodes(entries) == [Node("a", 4.0, 0.0), Node("b", 2.0, 1.0)]
    with pytest.raises(ConfigError, match="no alive node"):
        plan_resources(cluster(), [])


def test_decode_workers_auto_gives_a_gpu_extractor_the_cores_no_other_actor_holds():
    """A 16-core GPU node: six math actors keep one CPU each, the extractor reserves and decodes on the other ten."""
    gpu = [Node("head", 0, 0), Node("g", 16, 1)]
    plan = plan_resources(cluster(gpus_per_extractor=0.5, cpus_per_actor=2, coreset_shards=4, num_evaluators=2,
                                  colocate=False), gpu)
    (extractor,) = plan.extractors
    assert extractor.node_id == "g" and extractor.cpus == 10 and plan.decode_workers == (10,)
    assert [p.cpus for p in (*plan.holders, *plan.evaluators)] == [1.0] * 6
    assert sum(totals(plan)["g"]) == pytest.approx(16 + 1.0, abs=1e-3)  # 16 CPUs and the whole GPU
    two = plan_resources(cluster(gpus_per_extractor=0.5, cpus_per_actor=2, num_extractors=2, coreset_shards=2,
                                 num_evaluators=2, colocate=False), gpu)
    assert [p.cpus for p in two.extractors] == [6.0, 6.0] and two.decode_workers == (6, 6)
    crowded = plan_resources(cluster(gpus_per_extractor=1, cpus_per_actor=6, coreset_shards=8, num_evaluators=8,
                                     colocate=False), [Node("g", 8, 1)])
    assert crowded.extractors[0].cpus == 6 and crowded.decode_workers == (6,)  # never below cpus_per_actor
    assert plan_resources(cluster(cpus_per_actor=2), [Node("a", 2, 0)]).decode_workers == (1,)  # CPU: torch has the cores
    assert plan_resources(cluster(gpus_per_extractor=1, cpus_per_actor=2), [Node("a", 4, 0)]).decode_workers == (1, 1)
    fixed = plan_resources(cluster(gpus_per_extractor=0.5, cpus_per_actor=2, decode_workers=3), gpu)
    assert fixed.decode_workers == (3,) and fixed.extractors[0].cpus == 2 and fixed.summary()["decode_workers"] == [3]
    assert plan_resources(cluster(decode_workers=4), [Node("a", 2, 0)]).decode_workers == (4,)



def test_colocated_plan_starts_no_holders_and_keeps_the_gpu_for_the_extractors():
    """Where extractors have a GPU share (colocate auto) they hold and score their own features: no holder
    actors, and the evaluators, which only compute metrics, take one CPU each and no GPU; the extractor
    decodes on the rest. On CPU nodes auto keeps holders of their own; ``colocate: true`` forces it anywhere."""
    gpu = [Node("head", 0, 0), Node("g", 16, 1)]
    plan = plan_resources(cluster(gpus_per_extractor=0.5, cpus_per_actor=2, coreset_shards=4, num_evaluators=2), gpu)
    assert plan.colocate and plan.holders == () and plan.summary()["colocate"] is True
    assert [(p.cpus, p.gpus) for p in plan.evaluators] == [(1.0, 0.0)] * 2
    assert plan.extractors[0].cpus == 14 and plan.decode_workers == (14,)
    assert plan.warnings == ()  # no "math on the CPU" warning: the math runs in the extractors, on the GPU
    cpu = plan_resources(cluster(cpus_per_actor=2, coreset_shards=2), [Node("a", 2, 0)])
    assert not cpu.colocate and len(cpu.holders) == 2
    forced = plan_resources(cluster(cpus_per_actor=2, coreset_shards=2, colocate=True), [Node("a", 2, 0)])
    assert forced.colocate and forced.holders == ()
    padim = plan_resources(cluster(cpus_per_actor=2, coreset_shards=2), [Node("a", 2, 0)], coreset=False)
    assert not padim.colocate and padim.holders == () and len(padim.evaluators) == len(cpu.evaluators)
