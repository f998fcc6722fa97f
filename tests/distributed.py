"""Run a function on N CPU ranks with the gloo backend, for tests of moe_engine.parallel."""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # The shapes here are tiny and the ranks share the machine's cores: one thread per rank, or
    # N ranks x C threads contend for C cores.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any) -> None:
    """Spawn `world_size` processes running fn(rank, world_size, *args); an exception on any rank fails the caller.

    `fn` must be importable (a module-level function of a test module).
    """
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
