"""Fused DDPM/DDIM reverse step: kernel (on kernel_device: CUDA, or the Triton interpreter on CPU) against
the torch reference, which runs on the CPU as the oracle."""
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


def _run(fn, x, eps, z, coefs, gout, device="cpu"):
    """fn's output and input gradients for gradient gout, computed on device, returned on the CPU."""
    leaves = [t.detach().to(device).requires_grad_() if t is not None else None for t in (x, eps, z)]
    coefs = [c.to(device) if isinstance(c, torch.Tensor) else c for c in coefs]
    out = fn(*leaves, *coefs)
    out.backward(gout.to(device))
    # moved back only after both launches (the dry run's meta tensors cannot come back)
    return out.detach().cpu(), [t.grad.cpu() if t is not None else None for t in leaves]


def fused(*args):
    return reverse_step(*args, use_kernel=True)


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (2, 3, 8, 8)])
@pytest.mark.parametrize("eps_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_z", [True, False])
def test_kernel_matches_reference(shape, eps_dtype, with_z, kernel_device):
    g = torch.Generator().manual_seed(0)
    x, eps, z = _inputs(shape, torch.float32, eps_dtype, g, with_z)
    coefs = _coefs(shape[0], g)
    coefs[0][0], coefs[1][0] = 2.0, 1.0
    u = coefs[0][0] * x[0].view(-1)[:4] - coefs[1][0] * eps[0].view(-1)[:4].float()
    assert u.tolist() == [1.0, -1.0, 1.5, -1.5]  # the boundary cases really are there
    gout = torch.randn(shape, generator=g)
    ref, ref_grads = _run(step_reference, x, eps, z, coefs, gout)
    out, grads = _run(fused, x, eps, z, coefs, gout, kernel_device)
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


@pytest.mark.kernel
@needs_triton
def test_bf16_x_and_z(kernel_device):
    g = torch.Generator().manual_seed(1)
    x, eps, z = _inputs((2, 3, 5, 7), torch.bfloat16, torch.bfloat16, g)
    coefs, gout = _coefs(2, g), torch.randn(2, 3, 5, 7, generator=g).bfloat16()
    ref, ref_grads = _run(step_reference, x, eps, z, coefs, gout)
    out, grads = _run(fused, x, eps, z, coefs, gout, kernel_device)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, **TOL[torch.bfloat16])


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("ddim,last", [(True, False), (False, True), (True, True)])
def test_ddim_and_last_step(ddim, last, kernel_device):
    """DDIM has cx = 0; the last step has s = 0 (z may still be passed, or be None)."""
    g = torch.Generator().manual_seed(2)
    x, eps, z = _inputs((3, 3, 5, 7), torch.float32, torch.float32, g, with_z=not last)
    coefs, gout = _coefs(3, g, s_zero=last, ddim=ddim), torch.randn(3, 3, 5, 7, generator=g)
    ref, ref_grads = _run(step_reference, x, eps, z, coefs, gout)
    out, grads = _run(fused, x, eps, z, coefs, gout, kernel_device)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    for got, want in zip(grads, ref_grads):
        if want is not None:
            torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.kernel
@needs_triton
def test_channels_last(kernel_device):
    g = torch.Generator().manual_seed(3)
    x, eps, z = _inputs((2, 3, 8, 8), torch.float32, torch.float32, g)
    coefs, gout = _coefs(2, g), torch.randn(2, 3, 8, 8, generator=g)
    cl = [t.to(memory_format=torch.channels_last) for t in (x, eps, z)]
    ref, ref_grads = _run(step_reference, x, eps, z, coefs, gout)
    out, grads = _run(fused, *cl, coefs, gout.to(memory_format=torch.channels_last), kernel_device)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("kind", ["schedule row", "python numbers"])
def test_shared_coefficients(kind, kernel_device):
    """The samplers pass one step's row of the schedule: six 0-dim views of one (6,) tensor on the device
    (the kernel's shared-coefficient variant); python numbers work too."""
    g = torch.Generator().manual_seed(6)
    x, eps, z = _inputs((3, 3, 5, 7), torch.float32, torch.bfloat16, g)
    row = torch.stack([c[1] for c in _coefs(3, g)])
    row[0], row[1] = 2.0, 1.0  # a = 2, b = 1 put sample 0's first elements on the clip bounds (_inputs)
    gout = torch.randn(3, 3, 5, 7, generator=g)
    ref, ref_grads = _run(step_reference, x, eps, z, list(row), gout)
    coefs = list(row.to(kernel_device)) if kind == "schedule row" else row.tolist()
    out, grads = _run(fused, x, eps, z, coefs, gout, kernel_device)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    for got, want, inp in zip(grads, ref_grads, (x, eps, z)):
        torch.testing.assert_close(got, want, **TOL[inp.dtype])


def test_coef_table():
    """Scalars give the (6,) vector, any per-sample coefficient the (6, N) table (scalars broadcast)."""
    x = torch.zeros(3, 2)
    row = torch.arange(6.0)
    assert torch.equal(ddpm_step._coef_table(tuple(row), x), row)
    assert torch.equal(ddpm_step._coef_table((0, 1, 2.0, 3, 4, 5), x), row)
    mixed = ddpm_step._coef_table((torch.tensor([7.0, 8.0, 9.0]), *row[1:]), x)
    assert mixed.shape == (6, 3) and mixed.is_contiguous() and mixed.stride(0) == 3
    assert torch.equal(mixed[0], torch.tensor([7.0, 8.0, 9.0])) and torch.equal(mixed[1:, 2], row[1:])


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
