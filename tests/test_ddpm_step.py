"""Fused DDPM/DDIM reverse step: kernel (Triton interpreter on CPU) against the torch reference."""
import pytest
import torch

from addt_common import load_kernel

ddpm_step = load_kernel("ddpm_step")
reverse_step, step_reference = ddpm_step.reverse_step, ddpm_step.step_reference

needs_triton = pytest.mark.skipif(ddpm_step.triton is None, reason="triton not installed")
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def _coefs(n, g, s_zero=False, ddim=False):
    """Per-sample coefficients of the size a real schedule gives (a > 1, b ~ 0.1..3)."""
    a = 1.0 + 2 * torch.rand(n, generator=g)
    b = 0.1 + 3 * torch.rand(n, generator=g)
    c0, ce = torch.rand(n, generator=g), torch.rand(n, generator=g) - 0.5
    cx = torch.zeros(n) if ddim else torch.rand(n, generator=g)
    s = torch.zeros(n) if s_zero else 0.1 * torch.rand(n, generator=g)
    return [a, b, c0, cx, ce, s]


def _inputs(shape, x_dtype, eps_dtype, g, with_z=True):
    x = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g)
    # sample 0 gets a = 2, b = 1 and elements with a*x - b*eps exactly at -1 and +1 (the clip
    # bounds, where torch.clamp still passes the gradient) and exactly 0.5 beyond them
    x[0].view(-1)[:4] = torch.tensor([0.75, -0.75, 1.0, -1.0])
    eps[0].view(-1)[:4] = torch.tensor([0.5, -0.5, 0.5, -0.5])
    z = torch.randn(shape, generator=g) if with_z else None
    return x.to(x_dtype), eps.to(eps_dtype), (z.to(x_dtype) if with_z else None)


def _run(fn, x, eps, z, coefs, gout):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, eps, z)]
    out = fn(*leaves, *coefs)
    out.backward(gout)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


@needs_triton
@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (2, 3, 8, 8)])
@pytest.mark.parametrize("eps_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_z", [True, False])
def test_kernel_matches_reference(shape, eps_dtype, with_z):
    g = torch.Generator().manual_seed(0)
    x, eps, z = _inputs(shape, torch.float32, eps_dtype, g, with_z)
    coefs = _coefs(shape[0], g)
    coefs[0][0], coefs[1][0] = 2.0, 1.0
    u = coefs[0][0] * x[0].view(-1)[:4] - coefs[1][0] * eps[0].view(-1)[:4].float()
    assert u.tolist() == [1.0, -1.0, 1.5, -1.5]  # the boundary cases really are there
    gout = torch.randn(shape, generator=g)
    ref, ref_grads = _run(step_reference, x, eps, z, coefs, gout)
    out, grads = _run(lambda *t: reverse_step(*t, use_kernel=True), x, eps, z, coefs, gout)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    for got, want, inp in zip(grads, ref_grads, (x, eps, z)):
        if inp is None:
            assert got is None
            continue
        assert got.dtype == inp.dtype
        torch.testing.assert_close(got, want, **TOL[inp.dtype])
    # at the bounds the gradient goes through the clip, beyond them it does not
    a, b, c0, cx, ce, _ = (c[0].item() for c in coefs)
    gx0, geps0, go = grads[0][0].view(-1)[:4], grads[1][0].view(-1)[:4].float(), gout[0].view(-1)[:4]
    torch.testing.assert_close(gx0, go * torch.tensor([c0 * a + cx] * 2 + [cx] * 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(geps0, go * torch.tensor([ce - c0 * b] * 2 + [ce] * 2), **TOL[eps_dtype])


@needs_triton
def test_bf16_x_and_z():
    g = torch.Generator().manual_seed(1)
    x, eps, z = _inputs((2, 3, 5, 7), torch.bfloat16, torch.bfloat16, g)
    coefs, gout = _coefs(2, g), torch.randn(2, 3, 5, 7, generator=g).bfloat16()
    ref, ref_grads = _run(step_reference, x, eps, z, coefs, gout)
    out, grads = _run(lambda *t: reverse_step(*t, use_kernel=True), x, eps, z, coefs, gout)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, **TOL[torch.bfloat16])


@needs_triton
@pytest.mark.parametrize("ddim,last", [(True, False), (False, True), (True, True)])
def test_ddim_and_last_step(ddim, last):
    """DDIM has cx = 0; the last step has s = 0 (z may still be passed, or be None)."""
    g = torch.Generator().manual_seed(2)
    x, eps, z = _inputs((3, 3, 5, 7), torch.float32, torch.float32, g, with_z=not last)
    coefs, gout = _coefs(3, g, s_zero=last, ddim=ddim), torch.randn(3, 3, 5, 7, generator=g)
    ref, ref_grads = _run(step_reference, x, eps, z, coefs, gout)
    out, grads = _run(lambda *t: reverse_step(*t, use_kernel=True), x, eps, z, coefs, gout)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    for got, want in zip(grads, ref_grads):
        if want is not None:
            torch.testing.assert_close(got, want, **TOL[torch.float32])


@needs_triton
def test_channels_last():
    g = torch.Generator().manual_seed(3)
    x, eps, z = _inputs((2, 3, 8, 8), torch.float32, torch.float32, g)
    coefs, gout = _coefs(2, g), torch.randn(2, 3, 8, 8, generator=g)
    cl = [t.to(memory_format=torch.channels_last) for t in (x, eps, z)]
    ref, ref_grads = _run(step_reference, x, eps, z, coefs, gout)
    out, grads = _run(lambda *t: reverse_step(*t, use_kernel=True), *cl, coefs,
                      gout.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(4)
    shape = (2, 3, 4, 5)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    a, b, c0, cx, ce, s = _coefs(2, g)
    u = a.double().view(-1, 1, 1, 1) * x - b.double().view(-1, 1, 1, 1) * eps
    x = torch.where((u.abs() - 1).abs() < 0.05, x + 0.1, x)  # keep finite differences off the clip bounds
    u = a.double().view(-1, 1, 1, 1) * x - b.double().view(-1, 1, 1, 1) * eps
    assert ((u.abs() - 1).abs() > 1e-3).all() and (u.abs() > 1).any() and (u.abs() < 1).any()
    inputs = tuple(t.requires_grad_() for t in (x, eps, z))
    assert torch.autograd.gradcheck(lambda x, e, z: step_reference(x, e, z, a, b, c0, cx, ce, s), inputs)


def test_reverse_step_falls_back_on_cpu(monkeypatch):
    def boom(*args):
        raise AssertionError("kernel used on a CPU tensor")
    monkeypatch.setattr(ddpm_step.FusedStep, "apply", boom)
    g = torch.Generator().manual_seed(5)
    x, eps, z = _inputs((2, 3, 5, 7), torch.float32, torch.float32, g)
    coefs = _coefs(2, g)
    torch.testing.assert_close(reverse_step(x, eps, z, *coefs), step_reference(x, eps, z, *coefs))
