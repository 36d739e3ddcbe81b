"""Writes a category split's freshly extracted features into the feature cache, beside the run.

A Ray task pinned to the driver's node (where ``feature_cache.dir`` is, like ``output_dir``) that starts
once the shards exist: extraction and the coreset never wait for the disk. A failed write costs a
cache entry, never the run: the error comes back as a string for the driver to log.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from anomaly_core.feature_cache import FeatureCache
from anomaly_core.features import PatchFeatures


@ray.remote(num_cpus=0)
def _write_entry(folder: str, key: str, fields: dict[str, Any], *parts: PatchFeatures) -> str | None:
    try:
        FeatureCache(folder).save(key, parts, fields)
    except (OSError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def write_entry(folder: str, key: str, fields: dict[str, Any], parts: list[ray.ObjectRef]) -> ray.ObjectRef:
    """Queue the write of ``parts`` (shard references) under ``key``, on this (the driver's) node."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return _write_entry.options(scheduling_strategy=here).remote(folder, key, fields, *parts)
