"""The values that flow out of a router: `Routing`, and into it: `RoutingContext`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch


@dataclass(frozen=True)
class RoutingContext:
    """What conditional routers may read besides the tokens; plain top-k routers ignore it.

    All fields are per token, aligned with the router's `x_TD` rows, or None when unknown.
    """

    # (T,) int64: the task each token belongs to (task-conditional gates, task telemetry).
    task_ids_T: torch.Tensor | None = None
    # (T, A): token attributes such as modality, input/target role (attribute routing).
    attributes_TA: torch.Tensor | None = None
    # (T,) int64: the sequence each token belongs to (sequence-level load-balancing loss).
    sequence_ids_T: torch.Tensor | None = None


@dataclass(frozen=True)
class Routing:
    """A router's decision for T tokens with K choices each.

    weights_TK: (T, K) float32, the weight of each choice in the combine; 0 where dropped.
    experts_TK: (T, K) int64, the expert of each choice; -1 where capacity dropped it.
    scores_TE:  (T, E) float32, the router's scores after softmax/sigmoid (for statistics).
    aux_loss:   () float32, the weighted sum of the auxiliary losses, to add to the task loss.
    aux_terms:  named unweighted auxiliary loss values, detached, for logging.
    capacity:   rows each expert may take, or None when routing is dropless
                (then no choice is -1 and a dispatcher needs no device-to-host sync to size N).
    """

    weights_TK: torch.Tensor
    experts_TK: torch.Tensor
    scores_TE: torch.Tensor
    aux_loss: torch.Tensor
    aux_terms: Mapping[str, torch.Tensor] = field(default_factory=dict)
    capacity: int | None = None

    @property
    def num_experts(self) -> int:
        return self.scores_TE.shape[-1]

    @property
    def top_k(self) -> int:
        return self.experts_TK.shape[-1]
