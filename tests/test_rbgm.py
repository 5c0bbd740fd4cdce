"""RBGM: kernel (Triton interpreter on CPU, ~1.5 s per 1024-element row) against the reference."""
import pytest
import torch

from addt_common import load_kernel

rbgm_mod = load_kernel("rbgm")
rbgm, rbgm_reference, sorted_normal_rows = rbgm_mod.rbgm, rbgm_mod.rbgm_reference, rbgm_mod.sorted_normal_rows

needs_triton = pytest.mark.skipif(rbgm_mod.triton is None, reason="triton not installed")


def kernel(delta, normal):
    return rbgm_mod._rbgm_kernel_launch(delta, normal)


def _sample(delta, seed=0):
    n = delta.shape[-2] * delta.shape[-1]
    return sorted_normal_rows(delta.numel() // n, n, torch.Generator().manual_seed(seed))


def _check_rbgm(delta, normal, out):
    """Each row is the sorted sample put in the (position-stable) rank order of delta."""
    n = delta.shape[-2] * delta.shape[-1]
    rows = out.reshape(-1, n)
    assert out.shape == delta.shape and out.dtype == torch.float32
    assert torch.equal(rows.sort(dim=1).values, normal)  # exact permutation of the sample
    order = torch.argsort(delta.float().reshape(-1, n), dim=1, stable=True)
    assert torch.equal(rows.argsort(dim=1), order)  # samples are distinct, so argsort is unique


@needs_triton
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 3, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(shape, dtype):
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    normal = _sample(delta)
    ref = rbgm_reference(delta, normal)
    _check_rbgm(delta, normal, ref)  # bf16 rounding makes ties: position breaks them
    assert torch.equal(kernel(delta, normal), ref)


@needs_triton
def test_kernel_ties_signed_zero_nan():
    """Ties break by position in kernel and reference alike; all-equal rows map to the sample."""
    g = torch.Generator().manual_seed(2)
    delta = torch.randint(-2, 3, (2, 3, 5, 7), generator=g).float()  # 5 values over 35 elements
    delta[0, 1] = 0.25  # all equal
    delta[1, 2] = 0.0
    delta[1, 2, ::2] = -0.0  # -0.0 ranks below +0.0 (the integer key), in both implementations
    delta[1, 0, 0, :3] = torch.tensor([float("nan"), -float("nan"), float("inf")])
    normal = _sample(delta)
    ref = rbgm_reference(delta, normal)
    assert torch.equal(kernel(delta, normal), ref)
    _check_rbgm(delta[0], normal[:3], ref[0])
    assert torch.equal(ref[0, 1].flatten(), normal[1])  # all equal: rank = position
    zeros = ref[1, 2]
    assert (zeros[::2].max() < zeros[1::2].min()).item()
    row = ref[1, 0].flatten()
    assert row[0] == normal[3, -1] and row[1] == normal[3, 0] and row[2] == normal[3, -2]


@needs_triton
def test_kernel_64x64_row():
    """The largest row size (Tiny-ImageNet), once: BLOCK 4096, the longest sort."""
    delta = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    delta[0, 0, 10] = 0.5  # a run of ties
    normal = _sample(delta)
    ref = rbgm_reference(delta, normal)
    _check_rbgm(delta, normal, ref)
    assert torch.equal(kernel(delta, normal), ref)


def test_sorted_normal_rows_distribution():
    g = torch.Generator().manual_seed(4)
    x = sorted_normal_rows(2000, 64, generator=g)
    assert x.shape == (2000, 64) and x.dtype == torch.float32
    assert (x.diff(dim=1) >= 0).all() and torch.isfinite(x).all()
    want = torch.randn(2000, 64, generator=g).sort(dim=1).values
    # standard error of a mean order statistic over 2000 rows is <= 0.4 / sqrt(2000) ~ 0.009 (the
    # extremes); the difference of two such means <= 0.013, so 0.06 is > 4.5 sigma
    assert (x.mean(0) - want.mean(0)).abs().max() < 0.06
    assert (x.std(0) - want.std(0)).abs().max() < 0.05
    assert abs(x.mean().item()) < 0.015 and abs(x.std().item() - 1) < 0.015  # SE ~ 0.003
    big = sorted_normal_rows(2, 4096, generator=g)
    assert (big.diff(dim=1) >= 0).all() and torch.isfinite(big).all()


def test_rbgm_falls_back_on_cpu(monkeypatch):
    def boom(*args):
        raise AssertionError("kernel used on a CPU tensor")
    monkeypatch.setattr(rbgm_mod, "_rbgm_kernel_launch", boom)
    delta = torch.randn(2, 3, 5, 7)
    out = rbgm(delta, generator=torch.Generator().manual_seed(5))
    _check_rbgm(delta, _sample(delta, seed=5), out)


@needs_triton
def test_rbgm_deterministic_with_seed():
    delta = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(6))
    runs = [rbgm(delta, torch.Generator().manual_seed(7), use_kernel=k) for k in (False, False, True)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0], rbgm(delta, torch.Generator().manual_seed(8), use_kernel=False))
