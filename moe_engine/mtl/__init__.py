"""Multi-task learning on top of the MoE layer: task-conditional routers, multi-gate layers, task
telemetry, and the multi-task data and model of the default job.

Routers (forward (x_TD, ctx) -> Routing, selected by `moe.router.type`):
    TaskGateRouter      task_gate (M3ViT), mod_squad (Mod-Squad gates + MI loss), sparse MMoE gates
    AttributeRouter     attribute (Conditional MoE / Uni-Perceiver-MoE)
    DSelectKRouter      dselect_k (Hazimeh et al. 2021)
    TaskLevelRouter     task_level (Kudugunta et al. 2021), with extract_task_model
Layers: MoEAttention (experts in attention), TaskMoEBlock (shared attention/FFN routing, task
embedding), MultiGateMoE / SharedBottom / MultiTaskRegressor (MMoE, OMoE, shared-bottom).
"""

from moe_engine.mtl.adaptive_k import AdaptiveTopK
from moe_engine.mtl.attribute_router import AttributeRouter, uni_perceiver_attributes
from moe_engine.mtl.blocks import TaskMoEBlock
from moe_engine.mtl.dselect_k import DSelectKGate, DSelectKRouter, smooth_step
from moe_engine.mtl.gates import TaskGateRouter
from moe_engine.mtl.moe_attention import MoEAttention
from moe_engine.mtl.statistics import mutual_information_loss, task_expert_mass
from moe_engine.mtl.task_level import TaskLevelRouter, extract_task_ffn, extract_task_model
from moe_engine.mtl.telemetry import TaskExpertTelemetry

__all__ = [
    "AdaptiveTopK",
    "AttributeRouter",
    "DSelectKGate",
    "DSelectKRouter",
    "MoEAttention",
    "TaskExpertTelemetry",
    "TaskGateRouter",
    "TaskLevelRouter",
    "TaskMoEBlock",
    "extract_task_ffn",
    "extract_task_model",
    "mutual_information_loss",
    "smooth_step",
    "task_expert_mass",
    "uni_perceiver_attributes",
]
