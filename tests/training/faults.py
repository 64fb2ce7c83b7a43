"""Failure injection for the Ray Train tests (shipped to the workers by value)."""

import os
from pathlib import Path

import torch.distributed as dist


def kill_once(step: int, *, marker: str, at: int, rank: int = 1) -> None:
    """The worker of `rank` dies abruptly at `step`, the first time only (the marker file remembers)."""
    if step == at and dist.get_rank() == rank and not Path(marker).exists():
        Path(marker).write_text(f"killed rank {rank} at step {step}\n")
        os._exit(1)
