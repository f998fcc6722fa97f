"""CUDA checks of the reference layer and the trainer (skipped where there is no CUDA).

On CUDA, `torch._grouped_mm` takes bf16 only and needs compute capability 9.0, so the
grouped_mm rows run on Hopper or newer; the loop rows run on any CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from moe_engine.config import MoEConfig, RouterConfig, load_config
from moe_engine.layer import MoELayer
from moe_engine.train import Trainer
from reference_moe import moe_forward

pytestmark = pytest.mark.gpu


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.parametrize(
    "impl",
    [
        "loop",
        pytest.param("grouped_mm", marks=pytest.mark.skipif(not _hopper(), reason="torch._grouped_mm needs sm90")),
    ],
)
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_layer_bf16_on_cuda_matches_fp64_reference(impl: str, capacity_factor: float | None) -> None:
    torch.manual_seed(0)
    T, D, F, E, K = 96, 64, 128, 8, 2
    cfg = MoEConfig(num_experts=E, ffn_hidden=F, experts_impl=impl,
                    router=RouterConfig(top_k=K, capacity_factor=capacity_factor, z_loss_coef=0.0))
    layer = MoELayer.from_config(D, cfg).cuda().to(torch.bfloat16)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    grad_y = torch.randn_like(out.y)
    (out.y.float() * grad_y.float()).sum().backward()

    # The reference sees the same bf16-rounded values, in float64 on the CPU.
    params = [p.detach().double().cpu().requires_grad_() for p in (layer.router.weight, layer.experts.w_in, layer.experts.w_out)]
    x_ref = x.detach().double().cpu().requires_grad_()
    ref = moe_forward(x_ref, *params, top_k=K, capacity_factor=capacity_factor, aux_loss_coef=0.01)
    (ref.y_TD * grad_y.double().cpu()).sum().backward()

    assert torch.equal(out.routing.experts_TK.cpu(), ref.routing.experts_TK)
    torch.testing.assert_close(out.y.double().cpu(), ref.y_TD, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.aux_loss.double().cpu(), ref.aux_loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad.double().cpu(), x_ref.grad, atol=2e-2, rtol=2e-2)
    for param, ref_param in zip((layer.router.weight, layer.experts.w_in, layer.experts.w_out), params):
        torch.testing.assert_close(param.grad.double().cpu(), ref_param.grad, atol=3e-2, rtol=3e-2)


def test_expert_choice_with_many_experts_runs_the_triton_path_like_the_loop() -> None:
    # Expert choice gives K = E columns: the combine kernels unroll over K and the unpermute backward
    # holds a (BLOCK_T, next_pow2(K), BLOCK_D) tile, far wider than the K <= 8 they are tuned for.
    torch.manual_seed(3)
    T, D, F, E = 256, 64, 128, 64
    outs = {}
    for impl in ("triton", "loop"):
        torch.manual_seed(3)
        cfg = MoEConfig(num_experts=E, ffn_hidden=F, experts_impl=impl, router=RouterConfig(type="expert_choice", top_k=2))
        layer = MoELayer.from_config(D, cfg).cuda().to(torch.bfloat16)
        torch.manual_seed(4)
        x = torch.randn(T, D, device="cuda").to(torch.bfloat16).requires_grad_()
        out = layer(x)
        out.y.float().square().sum().backward()
        outs[impl] = (out.y.float(), x.grad.float(), layer.experts.w_in.grad.float(), layer.router.weight.grad.float())
    for got, want in zip(outs["triton"], outs["loop"]):
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


def test_trainer_uses_cuda_with_bf16_autocast(tmp_path) -> None:
    cfg = load_config(None, [
        "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "moe.num_experts=4", "moe.ffn_hidden=32",
        "data.pairs_per_task=200", "train.max_steps=20", "train.eval_every=20", "train.checkpoint_every=20",
        "logging.progress_bar=false", "logging.tensorboard=false", f"train.out_dir={tmp_path}",
    ])
    trainer = Trainer(cfg)
    assert trainer.device.type == "cuda" and trainer.amp_dtype == torch.bfloat16
    first = trainer.train_step(next(trainer.batches))["loss"]
    result = trainer.run()
    assert result.step == 20
    assert all(0.0 <= v <= 1.0 for k, v in result.eval_metrics.items() if k.startswith("accuracy_"))
    assert first == first  # finite first step


def test_triton_layer_backward_is_bitwise_deterministic_on_cuda(monkeypatch) -> None:
    # Every gradient of the Triton path is reduced without floating-point atomics (the fused gather's
    # dx included), so two backward passes over the same inputs give the same bits.
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")
    torch.manual_seed(0)
    T, D, F, E, K = 2048, 256, 512, 8, 2
    cfg = MoEConfig(num_experts=E, ffn_hidden=F, router=RouterConfig(top_k=K))
    layer = MoELayer.from_config(D, cfg).cuda().to(torch.bfloat16)
    x0 = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    grad_y = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    assert layer.experts.resolve_impl(x0.device, x0.dtype) == "triton"

    def grads() -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        out = layer(x)
        (out.y.float() * grad_y.float()).sum().add(out.aux_loss).backward()
        return [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
