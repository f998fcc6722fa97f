"""Shazeer et al. (2017)'s importance and load losses: the squared coefficient of variation, forward and backward.

cv2(x) = var(x) / (mean(x)^2 + 1e-10) over the E entries, with the *biased* variance (divide by
E), as tensor2tensor's `cv_squared` (the paper's code) computes it; the popular PyTorch port uses
torch.var's unbiased one, E/(E-1) times larger (../shared/REFERENCES.md).

- Importance loss: cv2(importance_E), importance_E = sum over tokens of the gates G_TE: a column
  sum over (BLOCK_T, BLOCK_E) tiles (atomics across token blocks), then one program for cv2.
  Its gradient broadcasts d cv2 / d importance_E over the tokens; it reads the atomically summed
  importance, so unlike the other losses' gradients its last bits may vary between runs.
- Load loss: cv2(load_E) for a load vector the caller computed (noisy top-k's smooth estimator).
- No entries or no tokens: 0. Multiply by the loss weight (w = 0.1 in the paper) outside.

The column-sum tiles share the candidates of the other loss kernels (`aux_losses._tile_configs`),
pinned with MOE_ENGINE_COLUMN_SUM_CONFIG.
"""

from __future__ import annotations

import torch

from moe_engine.kernels._triton import TRITON_AVAILABLE, launch
from moe_engine.kernels._triton import autotune as _autotune
from moe_engine.kernels._triton import jit as _jit
from moe_engine.kernels.aux_losses import _at_least_fp32, _check_matrix, _tile_configs, _tile_grid, _use_triton

if TRITON_AVAILABLE:
    import triton.language as tl

CV_EPS = 1e-10


# References (in fp32, or fp64 for fp64 inputs, so gradcheck can validate them)

def cv_squared_reference(x_E: torch.Tensor) -> torch.Tensor:
    """var(x) / (mean(x)^2 + 1e-10), biased variance, in fp32. x_E: (E,) float. () float32 (or 64)."""
    x_E = _at_least_fp32(x_E)
    if x_E.numel() == 0:
        return x_E.new_zeros(())
    mean = x_E.mean()
    return (x_E - mean).square().mean() / (mean.square() + CV_EPS)


def importance_cv_squared_reference(gates_TE: torch.Tensor) -> torch.Tensor:
    """cv2 of the importance sum_t G_te. gates_TE: (T, E) float. () float32 (or 64)."""
    return cv_squared_reference(_at_least_fp32(gates_TE).sum(dim=0))


def load_cv_squared_reference(load_E: torch.Tensor) -> torch.Tensor:
    """cv2 of the load vector. load_E: (E,) float. () float32 (or 64)."""
    return cv_squared_reference(load_E)


# Kernels

@_autotune("column_sum", _tile_configs(), key=["num_experts"], reset_to_zero=["out_ptr"])
def _column_sum_kernel(x_ptr, out_ptr, num_tokens, num_experts, stride_t, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    # out_e = sum_t x_te (importance); its gradient is the broadcast of the upstream (E,) gradient.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    col_ok = cols < num_experts
    x = tl.load(x_ptr + rows[:, None] * stride_t + cols[None, :], mask=(rows < num_tokens)[:, None] & col_ok[None, :],
                other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + cols, tl.sum(x, axis=0), mask=col_ok, sem="relaxed")


# Shapes: x (E,) float; grad_loss () fp32 (read if BACKWARD); loss () fp32 out (forward);
# grad_x (E,) in x's dtype out (BACKWARD). Grid: (1,), E looped over in BLOCK_E chunks.
@_jit
def _cv_squared_kernel(x_ptr, grad_loss_ptr, loss_ptr, grad_x_ptr, n, eps,
                       BACKWARD: tl.constexpr, BLOCK_E: tl.constexpr):
    # m = (1/n) sum x,  v = (1/n) sum (x - m)^2 (biased),  D = m^2 + eps,  cv2 = v / D.
    # dv/dx_e = 2 (x_e - m) / n (the mean's own derivative drops out: sum (x - m) = 0), dD/dx_e = 2m/n:
    #   dcv2/dx_e = 2 (x_e - m) / (n D) - v 2m / (n D^2) = 2 / (n D) * (x_e - m - m cv2).
    offs = tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_E,), tl.float32)
    for e0 in range(0, n, BLOCK_E):
        acc += tl.load(x_ptr + e0 + offs, mask=e0 + offs < n, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / n
    acc = tl.zeros((BLOCK_E,), tl.float32)
    for e0 in range(0, n, BLOCK_E):
        ok = e0 + offs < n
        d = tl.where(ok, tl.load(x_ptr + e0 + offs, mask=ok, other=0.0).to(tl.float32) - mean, 0.0)
        acc += d * d
    denom = mean * mean + eps
    cv2 = tl.sum(acc, axis=0) / n / denom
    if BACKWARD:
        scale = tl.load(grad_loss_ptr) * 2.0 / (n * denom)
        for e0 in range(0, n, BLOCK_E):
            ok = e0 + offs < n
            x = tl.load(x_ptr + e0 + offs, mask=ok, other=0.0).to(tl.float32)
            grad = scale * (x - mean - mean * cv2)
            tl.store(grad_x_ptr + e0 + offs, grad.to(grad_x_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(loss_ptr, cv2)


# Launchers

def _check_vector(name: str, x_E: torch.Tensor) -> torch.Tensor:
    if x_E.dim() != 1 or not x_E.is_floating_point():
        raise ValueError(f"{name}: expected a 1-D floating tensor (E,), got {x_E.dim()}-D {x_E.dtype}")
    return x_E.contiguous()


def cv_squared_triton(x_E: torch.Tensor) -> torch.Tensor:
    """cv2(x_E) () fp32, forward only."""
    x_E = _check_vector("x_E", x_E)
    loss = torch.zeros((), dtype=torch.float32, device=x_E.device)
    if x_E.numel():
        _cv_squared_kernel[(1,)](x_E, loss, loss, x_E, x_E.numel(), CV_EPS, BACKWARD=False, BLOCK_E=256)
    return loss


def cv_squared_backward_triton(x_E: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """d cv2 / d x_E times the scalar gradient: (E,) in x_E's dtype."""
    x_E = _check_vector("x_E", x_E)
    grad_E = torch.empty_like(x_E)
    if x_E.numel():
        _cv_squared_kernel[(1,)](x_E, grad_loss.float().contiguous(), grad_E, grad_E, x_E.numel(), CV_EPS,
                                 BACKWARD=True, BLOCK_E=256)
    return grad_E


def importance_cv_squared_triton(gates_TE: torch.Tensor, config: dict[str, int] | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cv2 of the importance () fp32, importance_E (E,) fp32), forward only."""
    gates_TE = _check_matrix("gates_TE", gates_TE)
    num_tokens, num_experts = gates_TE.shape
    importance_E = torch.zeros(num_experts, dtype=torch.float32, device=gates_TE.device)
    if num_tokens and num_experts:
        launch(_column_sum_kernel, _tile_grid(num_tokens, num_experts), config, gates_TE, importance_E, num_tokens,
               num_experts, gates_TE.stride(0))
    return cv_squared_triton(importance_E), importance_E


load_cv_squared_triton = cv_squared_triton


# Custom ops

@torch.library.custom_op("moe_engine::cv_squared", mutates_args=())
def _cv_squared_op(x_E: torch.Tensor) -> torch.Tensor:
    return cv_squared_triton(x_E)


@_cv_squared_op.register_fake
def _(x_E):
    return x_E.new_empty((), dtype=torch.float32)


@torch.library.custom_op("moe_engine::cv_squared_backward", mutates_args=())
def _cv_squared_backward_op(x_E: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    return cv_squared_backward_triton(x_E, grad_loss)


@_cv_squared_backward_op.register_fake
def _(x_E, grad_loss):
    return torch.empty_like(x_E)


def _cv_squared_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _cv_squared_autograd(ctx, grad_loss):
    if not ctx.needs_input_grad[0]:
        return None
    (x_E,) = ctx.saved_tensors
    return torch.ops.moe_engine.cv_squared_backward(x_E, grad_loss)


_cv_squared_op.register_autograd(_cv_squared_autograd, setup_context=_cv_squared_setup_context)


@torch.library.custom_op("moe_engine::importance_cv_squared", mutates_args=())
def _importance_op(gates_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return importance_cv_squared_triton(gates_TE)


@_importance_op.register_fake
def _(gates_TE):
    return gates_TE.new_empty((), dtype=torch.float32), gates_TE.new_empty(gates_TE.shape[1], dtype=torch.float32)


def _importance_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    ctx.num_tokens, ctx.dtype = inputs[0].shape[0], inputs[0].dtype


def _importance_autograd(ctx, grad_loss, grad_importance_E):
    if not ctx.needs_input_grad[0]:
        return None
    (importance_E,) = ctx.saved_tensors
    grad_E = torch.ops.moe_engine.cv_squared_backward(importance_E, grad_loss)
    if grad_importance_E is not None:
        grad_E = grad_E + grad_importance_E
    # importance_e = sum_t gates_te: its gradient is grad_E broadcast over the tokens (a view).
    return grad_E.to(ctx.dtype)[None, :].expand(ctx.num_tokens, -1)


_importance_op.register_autograd(_importance_autograd, setup_context=_importance_setup_context)


# Public API

def importance_cv_squared(gates_TE: torch.Tensor) -> torch.Tensor:
    """Shazeer's importance loss before its weight: cv2(sum_t gates_TE[t]). gates_TE: (T, E) float. () float32."""
    if _use_triton("importance_cv_squared", gates_TE):
        return torch.ops.moe_engine.importance_cv_squared(gates_TE)[0]
    return importance_cv_squared_reference(gates_TE)


def load_cv_squared(load_E: torch.Tensor) -> torch.Tensor:
    """Shazeer's load loss before its weight: cv2(load_E). load_E: (E,) float. () float32."""
    if _use_triton("load_cv_squared", load_E):
        return torch.ops.moe_engine.cv_squared(load_E)
    return load_cv_squared_reference(load_E)
