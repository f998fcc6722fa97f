"""Where tokens meet experts: dispatchers (local now; all-to-all expert parallelism plugs in here).

Only this package may call collectives.
"""

from moe_engine.parallel.all_to_all import AllToAllDispatcher, AllToAllDispatchMeta
from moe_engine.parallel.dispatcher import LocalDispatcher, LocalDispatchMeta, TokenDispatcher
from moe_engine.parallel.groups import ParallelGroups, build_parallel_groups, check_parallel_sizes

DISPATCHERS = ("local", "all_to_all")

__all__ = [
    "DISPATCHERS",
    "AllToAllDispatchMeta",
    "AllToAllDispatcher",
    "LocalDispatchMeta",
    "LocalDispatcher",
    "ParallelGroups",
    "TokenDispatcher",
    "build_parallel_groups",
    "check_parallel_sizes",
]
