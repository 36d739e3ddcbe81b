"""Deterministic split of a category's sample list into shards of whole batches.

Shards are made of whole ``batch_size`` chunks of the sorted sample list, so every image is embedded
in the same batch whatever the number of actors; which actor runs a shard changes nothing.
"""

from __future__ import annotations


def plan_shards(n_samples: int, batch_size: int, n_shards: int) -> list[range]:
    """Split ``range(n_samples)`` into at most ``n_shards`` contiguous runs of whole batches."""
    if n_samples < 0 or batch_size < 1 or n_shards < 1:
        raise ValueError(f"invalid shard plan: n_samples={n_samples}, batch_size={batch_size}, n_shards={n_shards}")
    n_batches = -(-n_samples // batch_size)
    n_shards = min(n_shards, n_batches)
    shards, start_batch = [], 0
    for shard in range(n_shards):
        batches = n_batches // n_shards + (1 if shard < n_batches % n_shards else 0)
        start, stop = start_batch * batch_size, min((start_batch + batches) * batch_size, n_samples)
        shards.append(range(start, stop))
        start_batch += batches
    return shards


def shard_count(n_samples: int, batch_size: int, n_extractors: int, batches_per_shard: int = 8) -> int:
    """How many shards a sample list is cut into for extractors that take the next shard when free: at
    least two per extractor (one running, one queued at the actor, so it never idles between shards), and
    shards of about ``batches_per_shard`` batches, so a slow node holds up little of a category."""
    n_batches = -(-n_samples // batch_size)
    return max(2 * max(n_extractors, 1), -(-n_batches // batches_per_shard))
