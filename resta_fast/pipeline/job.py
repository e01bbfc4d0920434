"""What the engine is given and what it fills in: one output of a pass.

A patch is a group of one ``Job``; a batch group is several jobs that share
inputs (the same Checkpoint objects), written in one pass over them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from resta_fast.io.checkpoint import Checkpoint
from resta_fast.io.source import TensorSource
from resta_fast.plan import Plan


@dataclass
class Inputs:
    """The checkpoints one job reads: the fine-tune and the operands of V and DARE."""

    finetuned: TensorSource  # a Checkpoint, or a LoraFinetuned
    aligned: Checkpoint | None = None
    unaligned: Checkpoint | None = None
    vector: Checkpoint | None = None
    dare_base: Checkpoint | None = None

    def all(self) -> list[TensorSource]:
        return [c for c in (self.finetuned, self.aligned, self.unaligned, self.vector, self.dare_base) if c is not None]


@dataclass
class RunStats:
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    nonfinite: dict[str, int] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    busy: dict[str, float] = field(default_factory=dict)  # per-stage thread seconds (see engine.py)


@dataclass
class Job:
    """One output of a pass: its plan, inputs, target directory and DARE settings.

    ``stats`` and ``error`` are filled in by ``engine.run_jobs``: a job that
    fails (its input changed, a write error) gets ``error`` and drops out while
    the others go on.
    """

    plan: Plan
    inputs: Inputs
    out_dir: Path
    dare: float | None
    seed: int
    metadata: dict[str, str]
    progress: Callable[[int, str], None] | None = None
    stats: RunStats = field(default_factory=RunStats)
    error: BaseException | None = None
