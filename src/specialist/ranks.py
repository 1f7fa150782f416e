"""Which process of a launch this is, and how the processes of `torchrun` / `accelerate launch` agree.

Every stage runs in every process; only rank 0 writes files. These helpers read the launcher's environment, so
they answer without initialising torch.distributed in a single-process run.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def wait_for_all_ranks() -> None:
    """A barrier across the launch (nothing in a single process)."""
    if world_size() > 1:
        import torch.distributed as dist
        from accelerate import PartialState

        PartialState()  # initialises the process group if the Trainer has not yet
        dist.barrier()  # PartialState.wait_for_everyone skips CPU launches that accelerate does not classify


def shared_across_ranks(value: str) -> str:
    """Rank 0's value on every rank, so all processes of a launch agree (on the run folder's name, say)."""
    if world_size() == 1:
        return value
    import torch.distributed as dist
    from accelerate import PartialState

    PartialState()  # initialises the process group the Trainer will use anyway
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
