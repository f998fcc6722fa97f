"""Per-step telemetry of expert parallelism: all-to-all volume and time, expert and rank load.

A `TrafficMeter` belongs to one dispatcher and accumulates what its all-to-alls moved (forward
and backward) until the trainer reads it once a step. Time is wall time around the blocking
collective on CPU (gloo), and CUDA events on the current stream on GPU, resolved only when read,
so measuring adds no synchronisation to the step itself.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch


class TrafficMeter:
    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.calls = 0
        self._cpu_seconds = 0.0
        self._cuda_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def measure(self, bytes_sent: int, bytes_received: int, on_cuda: bool) -> Iterator[None]:
        """Time one exchange that sends and receives these bytes to and from other ranks."""
        self.bytes_sent += bytes_sent
        self.bytes_received += bytes_received
        self.calls += 1
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._cuda_events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu_seconds += time.perf_counter() - t0

    def read_and_reset(self) -> dict[str, float]:
        """{'bytes_sent', 'bytes_received', 'seconds', 'calls'} since the last read."""
        seconds = self._cpu_seconds
        if self._cuda_events:
            self._cuda_events[-1][1].synchronize()  # NOTE: device-to-host sync, once per read
            seconds += sum(s.elapsed_time(e) for s, e in self._cuda_events) / 1e3
        stats = {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "seconds": seconds, "calls": self.calls}
        self.__init__()
        return stats


def load_imbalance(tokens_per_expert_RLE: torch.Tensor, ep_size: int) -> dict[str, float]:
    """Imbalance ratios (max / mean) of L MoE layers, averaged over layers.

    tokens_per_expert_RLE: (R, L, E) per-expert counts of each of the R = world / ep_size
    expert-data-parallel replicas (the rows its ep_size ranks routed, summed over them), or (L, E)
    for one replica. expert_imbalance: over the E experts of the counts summed over replicas (the
    whole batch's load). rank_imbalance: over the R * ep_size ranks, each computing the rows its
    replica sent to its contiguous block of E / ep_size experts (1.0 means every rank computes the
    same number of rows). Per replica, because replicas skewed in opposite directions would look
    balanced once summed.
    """
    counts = tokens_per_expert_RLE.float()
    if counts.dim() == 2:
        counts = counts.unsqueeze(0)
    replicas, layers, num_experts = counts.shape
    per_rank_LX = counts.view(replicas, layers, ep_size, num_experts // ep_size).sum(-1).permute(1, 0, 2)
    def ratio(x: torch.Tensor) -> float:
        # A layer that routed no token this step is balanced (every rank computes the same 0 rows):
        # 1.0, not 0 / 0 and not 0, which would pull the average over layers below 1.
        mean = x.mean(-1)
        return torch.where(mean > 0, x.max(-1).values / mean, 1.0).mean().item()

    return {"expert_imbalance": ratio(counts.sum(0)), "rank_imbalance": ratio(per_rank_LX.reshape(layers, -1))}
