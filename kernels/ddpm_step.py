"""Fused DDPM / DDIM reverse step, forward and backward each in one pass over memory.

Every reverse step of DDPM (fixed_large variance, clip) and DDIM (clip, eta >= 0) is, with float32
coefficients per sample ((N,) tensors) or shared by the batch (scalars, as the samplers pass them):
    x0_hat = clamp(a * x_t - b * eps, -1, 1)             # predicted x0, clipped
    x_prev = c0 * x0_hat + cx * x_t + ce * eps + s * z     # z: the step's noise (None when s == 0)
Backward, with m = (-1 <= a * x_t - b * eps <= 1) (torch.clamp passes the gradient at the bounds):
    grad_x = g * (c0 * m * a + cx),  grad_eps = g * (ce - c0 * m * b),  grad_z = g * s.
The attack backpropagates through every reverse step, so the unfused chain of ~8 elementwise
ops (each saving its own tensor) is the cost this removes. Math is fp32; x_prev comes back in
x_t's dtype and each gradient in its input's dtype (eps may be bf16 from an autocast UNet).
"""
import re

import torch

try:  # triton is optional: the reference path must work without it
    import triton
    import triton.language as tl
except ImportError:
    triton = None
# Triton before 3.2 (torch 2.4 / 2.5 bring 3.0 / 3.1) is left out: its interpreter cannot run the kernel
# tests, so the kernels are unproven there and every call takes the reference
if triton is not None and tuple(map(int, re.findall(r"\d+", triton.__version__)[:2])) < (3, 2):
    triton = None


if triton is not None:

    @triton.jit
    def _step_fwd_kernel(x_ptr, eps_ptr, z_ptr, coef_ptr, out_ptr, numel, coef_stride,
                         HAS_Z: tl.constexpr, PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
        n = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        base = n.to(tl.int64) * numel
        c = coef_ptr + n * PER_SAMPLE  # column n of the (6, N) table, or the (6,) vector
        a, b, c0 = tl.load(c), tl.load(c + coef_stride), tl.load(c + 2 * coef_stride)
        cx, ce = tl.load(c + 3 * coef_stride), tl.load(c + 4 * coef_stride)
        x = tl.load(x_ptr + base + offs, mask=mask).to(tl.float32)  # fp32 math even for bf16 inputs
        e = tl.load(eps_ptr + base + offs, mask=mask).to(tl.float32)
        x0_hat = tl.minimum(tl.maximum(a * x - b * e, -1.0), 1.0)
        out = c0 * x0_hat + cx * x + ce * e
        if HAS_Z:
            out += tl.load(c + 5 * coef_stride) * tl.load(z_ptr + base + offs, mask=mask).to(tl.float32)
        tl.store(out_ptr + base + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _step_bwd_kernel(g_ptr, x_ptr, eps_ptr, coef_ptr, gx_ptr, geps_ptr, gz_ptr, numel, coef_stride,
                         HAS_GZ: tl.constexpr, PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
        n = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        base = n.to(tl.int64) * numel
        c = coef_ptr + n * PER_SAMPLE
        a, b, c0 = tl.load(c), tl.load(c + coef_stride), tl.load(c + 2 * coef_stride)
        cx, ce = tl.load(c + 3 * coef_stride), tl.load(c + 4 * coef_stride)
        g = tl.load(g_ptr + base + offs, mask=mask).to(tl.float32)
        x = tl.load(x_ptr + base + offs, mask=mask).to(tl.float32)
        e = tl.load(eps_ptr + base + offs, mask=mask).to(tl.float32)
        u = a * x - b * e  # recomputed, not saved: cheaper than storing a mask tensor
        gc = tl.where((u >= -1.0) & (u <= 1.0), g * c0, 0.0)  # gradient through the clip
        tl.store(gx_ptr + base + offs, (gc * a + g * cx).to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(geps_ptr + base + offs, (g * ce - gc * b).to(geps_ptr.dtype.element_ty), mask=mask)
        if HAS_GZ:
            gz = g * tl.load(c + 5 * coef_stride)
            tl.store(gz_ptr + base + offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)


def _grid(x):
    numel = x.numel() // x.shape[0]
    block = min(1024, triton.next_power_of_2(numel))
    return (x.shape[0], triton.cdiv(numel, block)), numel, block


class FusedStep(torch.autograd.Function):
    """Launches the fused kernels; coef is _coef_table's (6,) or (6, N) tensor and never gets a gradient."""

    @staticmethod
    def forward(ctx, x_t, eps, z, coef):
        assert eps.shape == x_t.shape and (z is None or z.shape == x_t.shape)
        x_t, eps = x_t.contiguous(), eps.contiguous()  # channels_last becomes a plain NCHW copy
        z = z.contiguous() if z is not None else None
        out = torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device)
        grid, numel, block = _grid(x_t)
        _step_fwd_kernel[grid](x_t, eps, z if z is not None else x_t, coef, out, numel, coef.stride(0),
                               HAS_Z=z is not None, PER_SAMPLE=coef.dim() - 1, BLOCK=block, num_warps=4)
        ctx.save_for_backward(x_t, eps, coef)
        ctx.z_dtype = z.dtype if z is not None else None
        return out

    @staticmethod
    def backward(ctx, g):
        x_t, eps, coef = ctx.saved_tensors
        g = g.contiguous()
        gx = torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device)
        geps = torch.empty(eps.shape, dtype=eps.dtype, device=eps.device)
        has_gz = ctx.z_dtype is not None and ctx.needs_input_grad[2]
        gz = torch.empty(x_t.shape, dtype=ctx.z_dtype, device=x_t.device) if has_gz else None
        grid, numel, block = _grid(x_t)
        _step_bwd_kernel[grid](g, x_t, eps, coef, gx, geps, gz if has_gz else gx, numel, coef.stride(0),
                               HAS_GZ=has_gz, PER_SAMPLE=coef.dim() - 1, BLOCK=block, num_warps=4)
        return gx, geps, gz, None


def _coef_table(coefs, x):
    """The six coefficients (python numbers, 0-dim or (N,) tensors) as one fp32 tensor on x's device, never
    differentiated: (6,) when all are scalars (one step for the whole batch, as the samplers pass their
    schedule's row), else (6, N). One small kernel instead of a copy per coefficient."""
    if all(isinstance(c, (int, float)) for c in coefs):
        return torch.tensor(coefs, dtype=torch.float32, device=x.device)
    cs = [torch.as_tensor(c, dtype=torch.float32, device=x.device) for c in coefs]
    if any(c.dim() for c in cs):
        cs = [c.expand(x.shape[0]) for c in cs]
    return torch.stack(cs).detach()


def _coef(c, x):
    """A per-sample coefficient (python number or (N,) tensor) as a contiguous (N,) fp32 tensor."""
    c = torch.as_tensor(c, dtype=torch.float32, device=x.device).detach()  # never differentiated
    return c.expand(x.shape[0]).contiguous()


def step_reference(x_t, eps, z, a, b, c0, cx, ce, s):
    """Plain torch, autograd for the backward; fp32 math (fp64 when x_t is fp64, for gradcheck)."""
    dt = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    a, b, c0, cx, ce, s = (_coef(c, x_t).to(dt).view(shape) for c in (a, b, c0, cx, ce, s))
    x, e = x_t.to(dt), eps.to(dt)
    x0_hat = (a * x - b * e).clamp(-1.0, 1.0)
    x_prev = c0 * x0_hat + cx * x + ce * e
    if z is not None:
        x_prev = x_prev + s * z.to(dt)
    return x_prev.to(x_t.dtype)


def reverse_step(x_t, eps, z, a, b, c0, cx, ce, s, use_kernel: bool | None = None):
    """One reverse step x_t -> x_prev: the fused kernel on CUDA when triton is there, else torch."""
    if use_kernel is None:
        use_kernel = triton is not None and x_t.is_cuda and x_t.dtype != torch.float64
    if use_kernel and triton is None:
        raise RuntimeError("use_kernel=True needs triton >= 3.2")
    if use_kernel:
        return FusedStep.apply(x_t, eps, z, _coef_table((a, b, c0, cx, ce, s), x_t))
    return step_reference(x_t, eps, z, a, b, c0, cx, ce, s)
