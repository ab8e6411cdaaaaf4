"""A register-center actor whose process does not import verl.

verl starts one small named actor per worker group, through which rank 0 hands the other ranks its master
address and every rank records its node. Its class lives in a verl module, so its process imports all of
verl (torch, tensordict, transformers: about 4 s on the 2-core VM) to hold two dicts, and the worker group's
start waits for it twice in a row (rank 0 for its reply, the trainer before it starts the other ranks).
``plugin.install`` makes verl create this one instead: the same three methods, in a module that imports only
ray.
"""

from __future__ import annotations

import ray


class RegisterCenter:
    """Rank 0's address and each rank's node, for the ranks of one worker group."""

    def __init__(self, rank_zero_info: dict):
        self.rank_zero_info = rank_zero_info
        self.workers_info: dict[int, str] = {}

    def get_rank_zero_info(self) -> dict:
        return self.rank_zero_info

    def set_worker_info(self, rank: int, node_id: str) -> None:
        self.workers_info[rank] = node_id

    def get_worker_info(self) -> dict[int, str]:
        return self.workers_info


def create_register_center(name: str, info: dict):
    """The named actor verl's ``create_worker_group_register_center(name, info)`` would create."""
    return ray.remote(RegisterCenter).options(name=name).remote(info)
