"""Seeds derived from names, so random draws never depend on global state or on which actor ran first."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: str) -> int:
    """A stable 63-bit seed for ``(seed, dataset, category, stage)``; same inputs, same seed, anywhere."""
    digest = hashlib.sha256("\x1f".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
