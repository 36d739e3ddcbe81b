"""Asking for the nodes a run needs (cluster/scaling.py) and cutting shards for extractors that pull work.

The end-to-end case, a fake autoscaling cluster that starts with zero workers and launches its GPU worker
for the job, is tests/test_autoscaling.py; these tests drive the waiting logic with a fake clock.
"""

from __future__ import annotations

import pytest

from anomaly_core.config import ConfigError, parse_config
from cluster.resources import Node, plan_resources
from cluster.scaling import acquire_nodes, extractor_bundles, fits
from cluster.sharding import plan_shards, shard_count


def cluster(**values):
    return parse_config({"datasets": [{"name": "d", "format": "folder", "root": "."}], "cluster": values}, "test").cluster


class FakeCluster:
    """Nodes that appear after ``arrive_after`` seconds of a fake clock; records the autoscaler requests."""

    def __init__(self, start: list[Node], later: list[Node], arrive_after: float) -> None:
        self.start, self.later, self.arrive_after = start, later, arrive_after
        self.now = 0.0
        self.requests: list[list[dict]] = []

    def nodes(self) -> list[Node]:
        return self.start + (self.later if self.now >= self.arrive_after else [])

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def acquire(self, config, wait_s: float) -> list[Node]:
        return acquire_nodes(config, wait_s, nodes_now=self.nodes, request=lambda bundles: self.requests.append(bundles),
                             clock=lambda: self.now, sleep=self.sleep)


def test_bundles_follow_the_extractor_keys():
    assert extractor_bundles(cluster(gpus_per_extractor=0.5, cpus_per_actor=4)) == [{"CPU": 4.0, "GPU": 0.5}]
    assert extractor_bundles(cluster(num_extractors=3, cpus_per_actor=2)) == [{"CPU": 2.0}] * 3


def test_fits_packs_bundles_per_node_like_the_plan():
    head, gpu = Node("head", 0, 0), Node("g", 8, 1)
    assert not fits([{"CPU": 2, "GPU": 0.5}], [head])
    assert fits([{"CPU": 2, "GPU": 0.5}] * 2, [head, gpu])
    assert not fits([{"CPU": 2, "GPU": 0.5}] * 3, [head, gpu])  # three halves of one GPU
    assert not fits([{"CPU": 6, "GPU": 0.5}] * 2, [gpu])  # GPU room but not CPU room
    assert fits([{"CPU": 6, "GPU": 0.5}] * 2, [gpu, Node("g2", 8, 1)])


def test_a_cluster_with_only_its_head_asks_for_gpu_workers_and_plans_on_them():
    config = cluster(gpus_per_extractor=0.5, cpus_per_actor=2, num_extractors=2)
    fake = FakeCluster([Node("head", 0, 0)], [Node("w1", 4, 1)], arrive_after=12.0)
    nodes = fake.acquire(config, wait_s=60)
    assert fake.requests == [[{"CPU": 2.0, "GPU": 0.5}] * 2]  # asked once (the pipeline withdraws it once placed)
    plan = plan_resources(config, nodes)
    assert {p.node_id for p in (*plan.extractors, *plan.holders, *plan.evaluators)} == {"w1"}  # the head runs none
    assert fake.now == pytest.approx(12.0)


def test_nodes_that_never_come_end_the_wait_with_the_keys_named():
    fake = FakeCluster([Node("head", 4, 0)], [], arrive_after=0)
    with pytest.raises(ConfigError, match=r"did not offer 1 x \{CPU: 2, GPU: 1\} within cluster.resource_wait_s=30 s.*"
                                          r"4 CPU/0 GPU.*cluster.gpus_per_extractor"):
        fake.acquire(cluster(gpus_per_extractor=1, cpus_per_actor=2), wait_s=30)
    assert fake.requests[-1] == [] and 30 <= fake.now < 32  # bounded, and the request withdrawn


def test_no_wait_and_no_request_when_the_nodes_are_there_or_ray_is_embedded():
    fake = FakeCluster([Node("g", 8, 1)], [], arrive_after=0)
    assert fake.acquire(cluster(gpus_per_extractor=1), wait_s=600) == [Node("g", 8, 1)]
    laptop = FakeCluster([Node("laptop", 2, 0)], [], arrive_after=0)
    assert laptop.acquire(cluster(gpus_per_extractor=1), wait_s=0) == [Node("laptop", 2, 0)]
    assert fake.requests == laptop.requests == [] and fake.now == laptop.now == 0


@pytest.mark.parametrize("n,batch,extractors", [(239, 8, 1), (112, 8, 2), (5, 8, 4), (3629, 32, 16)])
def test_shards_for_pulling_extractors_keep_whole_batches(n, batch, extractors):
    count = shard_count(n, batch, extractors)
    shards = plan_shards(n, batch, count)
    assert [i for shard in shards for i in shard] == list(range(n))
    assert all(shard.start % batch == 0 for shard in shards)  # every image keeps its batch
    n_batches = -(-n // batch)
    assert len(shards) == min(n_batches, max(2 * extractors, -(-n_batches // 8)))
    assert max(len(shard) for shard in shards) <= 8 * batch or len(shards) == 2 * extractors
