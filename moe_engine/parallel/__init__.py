"""Where tokens meet experts: dispatchers (local now; all-to-all expert parallelism plugs in here).

Only this package may call collectives.
"""

from moe_engine.parallel.dispatcher import LocalDispatcher, LocalDispatchMeta, TokenDispatcher

DISPATCHERS = ("local",)

__all__ = ["DISPATCHERS", "LocalDispatchMeta", "LocalDispatcher", "TokenDispatcher"]
