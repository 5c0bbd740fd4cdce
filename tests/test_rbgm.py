"""RBGM: kernel (on kernel_device: CUDA, or the Triton interpreter on CPU at ~3 s per 1024-element row)
against the reference, which runs on the CPU as the oracle."""
import pytest
import torch

from addt_common import load_kernel

rbgm_mod = load_kernel("rbgm")
rbgm, rbgm_reference, sorted_normal_rows = rbgm_mod.rbgm, rbgm_mod.rbgm_reference, rbgm_mod.sorted_normal_rows

needs_triton = pytest.mark.skipif(rbgm_mod.triton is None, reason="triton >= 3.2 not installed")


def kernel(delta, normal, device):
    """The kernel on `device`, its output back on the CPU."""
    return rbgm_mod._rbgm_kernel_launch(delta.to(device), normal.to(device)).cpu()


def _raw_sample(delta, seed=0):
    """The unsorted N(0, 1) sample rbgm draws for delta (what the kernel gets)."""
    n = delta.shape[-2] * delta.shape[-1]
    return torch.randn(delta.numel() // n, n, generator=torch.Generator().manual_seed(seed))


def _sample(delta, seed=0):
    n = delta.shape[-2] * delta.shape[-1]
    return sorted_normal_rows(delta.numel() // n, n, torch.Generator().manual_seed(seed))


def _check_rbgm(delta, normal, out):
    """Each row is the sorted sample put in the (position-stable) rank order of delta."""
    n = delta.shape[-2] * delta.shape[-1]
    rows = out.reshape(-1, n)
    assert out.shape == delta.shape and out.dtype == torch.float32
    assert torch.equal(rows.sort(dim=1).values, normal.sort(dim=1).values)  # exact permutation of the sample
    order = torch.argsort(delta.float().reshape(-1, n), dim=1, stable=True)
    assert torch.equal(rows.argsort(dim=1), order)  # samples are distinct, so argsort is unique


def _bits(x):
    return x.contiguous().view(torch.int32)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 3, 8, 8), (4, 3, 1, 1)])  # 1x1: rows of one lane
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.kernel
@needs_triton
def test_kernel_matches_reference(shape, dtype, kernel_device):
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    normal = _raw_sample(delta)  # unsorted, as rbgm hands it over: both sort it
    ref = rbgm_reference(delta, normal)
    _check_rbgm(delta, normal, ref)  # bf16 rounding makes ties: position breaks them
    assert torch.equal(_bits(kernel(delta, normal, kernel_device)), _bits(ref))


@pytest.mark.kernel
@needs_triton
def test_kernel_ties_signed_zero_nan(kernel_device):
    """Ties break by position in kernel and reference alike; all-equal rows map to the sample. Signed
    zeros in the sample come back as +0.0 from both; a sorted sample is sorted again to itself."""
    g = torch.Generator().manual_seed(2)
    delta = torch.randint(-2, 3, (2, 3, 5, 7), generator=g).float()  # 5 values over 35 elements
    delta[0, 1] = 0.25  # all equal
    delta[1, 2] = 0.0
    delta[1, 2, ::2] = -0.0  # -0.0 ranks below +0.0 (the integer key), in both implementations
    delta[1, 0, 0, :3] = torch.tensor([float("nan"), -float("nan"), float("inf")])
    normal = _sample(delta)  # sorted (as bench.py's "map" rows pass it), sorted again by both
    # signed zeros: a bitonic compare-swap of two equal values keeps one of them twice, so here the kernel's
    # sort alone returns three -0.0 where torch.sort returns two +0.0 and one -0.0: both make them +0.0
    normal[4, 10:13] = torch.tensor([0.0, -0.0, 0.0])
    ref = rbgm_reference(delta, normal)
    assert torch.equal(_bits(kernel(delta, normal, kernel_device)), _bits(ref))
    _check_rbgm(delta[0], normal[:3], ref[0])
    assert torch.equal(ref[0, 1].flatten(), normal[1])  # all equal: rank = position
    zeros = ref[1, 2]
    assert (zeros[::2].max() < zeros[1::2].min()).item()
    row = ref[1, 0].flatten()
    assert row[0] == normal[3, -1] and row[1] == normal[3, 0] and row[2] == normal[3, -2]
    signed = ref[1, 1].flatten()
    assert (_bits(signed) == 0).sum() == 3  # the three zeros of the sample, all +0.0


@pytest.mark.kernel
@needs_triton
def test_kernel_32x32_row(kernel_device):
    """One CIFAR row (BLOCK 1024, the size rbgm sends to the kernel), with a run of ties."""
    delta = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(8))
    delta[0, 0, 5] = -0.5
    normal = _raw_sample(delta, seed=9)
    ref = rbgm_reference(delta, normal)
    _check_rbgm(delta, normal, ref)
    assert torch.equal(_bits(kernel(delta, normal, kernel_device)), _bits(ref))


@needs_triton
def test_kernel_refuses_rows_longer_than_1024():
    """64x64 rows (Tiny-ImageNet) always take the reference, which the bench measured faster there."""
    with pytest.raises(ValueError, match="at most 1024"):
        rbgm_mod._rbgm_kernel_launch(torch.zeros(1, 1, 33, 32), torch.zeros(1, 33 * 32))


def test_sorted_normal_rows_is_the_sorted_draw():
    """The sample is torch.randn's draw from the generator, each row sorted exactly, zeros +0.0."""
    z = torch.randn(300, 64, generator=torch.Generator().manual_seed(4))
    x = sorted_normal_rows(300, 64, generator=torch.Generator().manual_seed(4))
    assert x.shape == (300, 64) and x.dtype == torch.float32
    assert (x.diff(dim=1) >= 0).all() and torch.isfinite(x).all()
    assert torch.equal(x, z.sort(dim=1).values)
    signed = rbgm_mod.sort_rows(torch.tensor([[0.5, -0.0, 0.0, -1.0, -0.0]]))
    assert _bits(signed).tolist() == _bits(torch.tensor([[-1.0, 0.0, 0.0, 0.0, 0.5]])).tolist()


@pytest.mark.parametrize("version, kept", [("3.0.0", False), ("3.1.1", False), ("2.3.1", False), ("3.2.0", True),
                                           ("3.10.0+git12ab", True), ("4.0.0", True)])
@pytest.mark.parametrize("name", ["rbgm", "ddpm_step"])
def test_triton_before_3_2_leaves_the_kernels_out(name, version, kept, monkeypatch):
    """A kernel module imported beside a Triton older than 3.2 (torch 2.4 / 2.5 bring 3.0 / 3.1, whose
    interpreter cannot run the kernel tests) defines no kernel: calls take the reference, and asking for
    the kernel names the version needed."""
    import importlib.util
    import os

    import triton
    monkeypatch.setattr(triton, "__version__", version)
    path = os.path.join(os.path.dirname(rbgm_mod.__file__), f"{name}.py")  # kernels/NAME.py, whatever the repo path
    spec = importlib.util.spec_from_file_location(f"fresh_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (mod.triton is triton) == kept
    x = torch.randn(2, 3, 5, 7)
    if name == "rbgm":
        call = lambda use: mod.rbgm(x, torch.Generator().manual_seed(1), use_kernel=use)  # noqa: E731
        want = rbgm_reference(x, torch.randn(6, 35, generator=torch.Generator().manual_seed(1)))
    else:
        call = lambda use: mod.reverse_step(x, x, None, 1.0, 0.5, 0.3, 0.6, 0.1, 0.0, use_kernel=use)  # noqa: E731
        want = mod.step_reference(x, x, None, 1.0, 0.5, 0.3, 0.6, 0.1, 0.0)
    assert torch.equal(call(None), want)
    if not kept:
        with pytest.raises(RuntimeError, match=r"needs triton >= 3\.2"):
            call(True)


def test_rbgm_falls_back_on_cpu(monkeypatch):
    def boom(*args):
        raise AssertionError("kernel used on a CPU tensor")
    monkeypatch.setattr(rbgm_mod, "_rbgm_kernel_launch", boom)
    delta = torch.randn(2, 3, 5, 7)
    out = rbgm(delta, generator=torch.Generator().manual_seed(5))
    _check_rbgm(delta, _sample(delta, seed=5), out)


def test_kernel_path_rule():
    """use_kernel=None on CUDA: the kernel for rows of <= 1024 elements and batches of <= 2**20 elements.
    The benched shapes: 128x3x32x32 kernel; 1024x3x32x32 and 64x3x64x64 reference (module docstring)."""
    rule = rbgm_mod.kernel_path
    assert rule(128 * 3, 32 * 32) and not rule(1024 * 3, 32 * 32) and not rule(64 * 3, 64 * 64)
    assert rule(1024, 1024) and not rule(1025, 1024)  # 2**20 elements
    assert rule(2 ** 20 // 784, 784) and not rule(2 ** 20 // 784 + 1, 784)  # 28x28
    assert rule(1, 1024) and not rule(1, 1025) and not rule(1, 4096)


def test_rbgm_takes_the_path_of_the_rule(monkeypatch):
    """rbgm(use_kernel=None) asks kernel_path with (rows, H*W) when the device can run the kernel."""
    calls = []
    monkeypatch.setattr(rbgm_mod, "_kernel_device", lambda delta: True)  # as if delta were on CUDA
    monkeypatch.setattr(rbgm_mod, "_rbgm_kernel_launch", lambda d, z: calls.append("kernel") or d.float())
    monkeypatch.setattr(rbgm_mod, "rbgm_reference", lambda d, z: calls.append("reference") or d.float())
    for shape in [(128, 3, 32, 32), (1024, 3, 32, 32), (64, 3, 64, 64), (2, 3, 5, 7)]:
        rbgm(torch.zeros(shape))
    assert calls == ["kernel", "reference", "reference", "kernel"]
    calls.clear()
    rbgm(torch.zeros(2, 3, 5, 7), use_kernel=False)
    rbgm(torch.zeros(64, 3, 32, 32), use_kernel=True)
    assert calls == ["reference", "kernel"]


@pytest.mark.kernel
@needs_triton
def test_rbgm_kernel_path_equals_reference_path(kernel_device, kernel_generator):
    """The same generator state gives the same bits on both paths; another state another sample."""
    delta = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(6)).to(kernel_device)
    runs = [rbgm(delta, kernel_generator(7), use_kernel=k) for k in (False, False, True)]
    runs = [r.cpu() for r in runs]  # after every launch (the dry run's meta tensors cannot come back)
    assert torch.equal(_bits(runs[0]), _bits(runs[1])) and torch.equal(_bits(runs[0]), _bits(runs[2]))
    assert not torch.equal(runs[0], rbgm(delta, kernel_generator(8), use_kernel=False).cpu())
