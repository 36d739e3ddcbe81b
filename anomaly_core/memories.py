"""Saved memories of the memory-based methods, told apart by their files: PaDiM's statistics
(``padim.json``) or a PatchCore bank (``bank.json``).

Why a table: the jobs that score a saved memory (jobs.evaluate, jobs.predict, ``--resume``) look up how to
load it and how its recorded scoring scores here, by what the folder holds, and never ask for a method by
name; a new memory-based method adds one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from anomaly_core.bank import MemoryBank, load_bank
from anomaly_core import padim
from anomaly_core.patchcore import bank_scoring_params


@dataclass(frozen=True)
class SavedMemory:
    method: str  # the config's ``method`` that builds it (and must score it)
    record: str  # its JSON file, by which a folder is recognised
    tensors: str
    load: Callable[[Path], MemoryBank]  # from its folder or its tensors file; refused when damaged
    # The scoring its record describes (``metadata["scoring"]``): ``.scorer(memory.scoring_payload(), device, threads)``
    scoring: Callable[[dict[str, Any]], Any]


SAVED_MEMORIES = (
    SavedMemory("padim", padim.METADATA_FILE, padim.TENSORS_FILE, padim.load_statistics, padim.recorded_scoring),
    SavedMemory("patchcore", "bank.json", "bank.safetensors", load_bank, bank_scoring_params),
)


def saved_memory(path: Path) -> SavedMemory:
    """What ``path`` (a folder, or its tensors file) holds: the first kind whose record the folder has, or whose
    tensors file it names; else a bank, whose loader names the file that is missing."""
    path = Path(path)
    if path.is_dir():
        return next((kind for kind in SAVED_MEMORIES if (path / kind.record).is_file()), SAVED_MEMORIES[-1])
    return next((kind for kind in SAVED_MEMORIES if path.name == kind.tensors), SAVED_MEMORIES[-1])


def load_memory(path: Path) -> tuple[SavedMemory, MemoryBank]:
    """The saved memory at ``path`` and its kind, loaded and checked by its kind's loader."""
    kind = saved_memory(path)
    return kind, kind.load(Path(path))
