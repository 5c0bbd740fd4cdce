"""Rank-Based Gaussian Mapping (RBGM, paper section 5.1) for a batch of perturbations.

Every (image, channel) row of H*W elements of `delta` is replaced by an N(0, 1) sample of H*W values
put in the rank order of the row: the element with the k-th smallest value gets the k-th smallest
sample value, so each output row is an exact permutation of the sample.

Rank order (kernel and reference agree exactly): values are compared as float32 through the
order-preserving integer key below, ties are broken by position (lower flat index = lower rank).
Under that key -0.0 ranks just below +0.0, a NaN with the sign bit clear ranks above +inf and one
with the sign bit set below -inf. float64 inputs are rounded to float32 first (may create ties).

The sample is torch.randn from the caller's generator, sorted per row: the kernel sorts it in
registers beside delta's keys (one program per row: two bitonic sorts and one scatter, nothing else
touches memory), the reference with torch.sort. Both give the same sorted values; only -0.0 and +0.0
compare equal (a bitonic compare-swap of the two keeps one of them twice), so both make zeros +0.0
after sorting and return the same bits for the same generator state.

Which path rbgm(use_kernel=None) takes on CUDA (the CPU always takes the reference): the kernel for
rows of at most MAX_ROW = 1024 elements (32x32 images; the kernel handles no longer rows) in batches of at
most KERNEL_MAX_ELEMENTS = 2**20 elements, the reference otherwise (kernel_path). Measured on an H200 (torch 2.11, triton 3.6) before
the kernel sorted the sample (torch drew a sorted sample, the kernel only mapped it): 1.64x the
reference at 128x3x32x32, 1.01x at 1024x3x32x32, 0.73x at 64x3x64x64. Small batches are bound by
launches: the reference runs about 12 torch kernels, the kernel path 2 (randn and the kernel). Large
ones are bound by the sort, where one program's bitonic network loses to torch's radix sort per row:
a row of 4096 costs 5.6x the instructions of a row of 1024 (sm_90 SASS: 75.6k vs 13.5k warp
instructions at 8 warps), and 192 rows leave most of 132 SMs idle. Sorting the sample adds half a
network (20.1k warp instructions per row of 1024 at 8 warps; 12.4k for the map alone at the former
4 warps): free where launches bound the time, a loss where the map alone only tied, hence 2**20
elements, a third of that tie (3072 rows of 1024). tests/test_rbgm.py checks the rule.
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

MAX_ROW = 1024  # 32x32; one row is sorted in registers by one program (64x64 rows: the reference, faster there)
KERNEL_MAX_ELEMENTS = 2 ** 20  # use_kernel=None: larger batches take the reference


if triton is not None:

    @triton.jit
    def _rbgm_kernel(delta_ptr, normal_ptr, out_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(delta_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
        # float32 -> int32 with the same order: flip the magnitude bits of negatives
        bits = x.to(tl.int32, bitcast=True)
        key32 = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        # value in the high 32 bits, position in the low bits: one sort gives a stable argsort
        key = (key32.to(tl.int64) << 32) | offs.to(tl.int64)
        key = tl.where(mask, key, 0x7FFFFFFFFFFFFFFF)  # padding lanes sort last
        idx = (tl.sort(key) & 0x7FFFFFFF).to(tl.int32)  # argsort: position of the k-th smallest element
        # the sample sorted (padding +inf sorts last); + 0.0 makes -0.0 +0.0, as in sort_rows
        g = tl.sort(tl.load(normal_ptr + row * n + offs, mask=mask, other=float("inf"))) + 0.0
        tl.store(out_ptr + row * n + idx, g, mask=mask)


def _num_warps(block):
    """Four values of a row per thread, at most 8 warps: the sort is bound by
    the latency of its shuffles and barriers, so a short chain per warp matters more than the total."""
    return min(8, max(1, block // 128))


def _rbgm_kernel_launch(delta, normal):
    """RBGM of delta with the sample `normal` ((rows, H*W) finite values in any order; the kernel sorts them)."""
    n = delta.shape[-2] * delta.shape[-1]
    if n > MAX_ROW:
        raise ValueError(f"RBGM kernel handles rows of at most {MAX_ROW} elements, got {n}")
    x = delta.contiguous()
    normal = normal.to(torch.float32).contiguous()
    out = torch.empty(delta.shape, dtype=torch.float32, device=delta.device)
    block = max(2, triton.next_power_of_2(n))  # tl.sort of one lane does not compile (Triton 3.4)
    _rbgm_kernel[(x.numel() // n,)](x, normal, out, n, BLOCK=block, num_warps=_num_warps(block))
    return out


def _order_key(x):
    """The kernel's order-preserving int32 key of x rounded to float32."""
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def sort_rows(normal):
    """Each row of the sample sorted, zeros as +0.0 (the kernel's sort may turn -0.0 into +0.0 or back)."""
    return normal.to(torch.float32).sort(dim=1).values + 0.0


def rbgm_reference(delta, normal):
    """Plain torch: the sample sorted, a stable argsort of each row of delta, the sorted sample
    scattered into rank order."""
    n = delta.shape[-2] * delta.shape[-1]
    idx = torch.argsort(_order_key(delta.reshape(-1, n)), dim=1, stable=True)
    out = torch.empty(idx.shape, dtype=torch.float32, device=delta.device)
    out.scatter_(1, idx, sort_rows(normal.reshape(idx.shape)))
    return out.view(delta.shape)


def sorted_normal_rows(rows, n, generator=None, device=None):
    """(rows, n) float32: the sample rbgm draws from this generator state, each row sorted."""
    return sort_rows(torch.randn(rows, n, generator=generator, device=device))


def _kernel_device(delta):
    """Whether delta's device runs the compiled kernel (CUDA, with triton installed)."""
    return triton is not None and delta.is_cuda


def kernel_path(rows, n):
    """Whether rbgm(use_kernel=None) takes the kernel for `rows` rows of n elements on CUDA (module docstring)."""
    return n <= MAX_ROW and rows * n <= KERNEL_MAX_ELEMENTS


def rbgm(delta, generator=None, use_kernel: bool | None = None):
    """RBGM of delta (N, C, H, W): float32 of delta's shape, a fresh N(0, 1) sample per row from
    `generator`. use_kernel: None chooses by shape (kernel_path), True / False force the kernel / torch."""
    n = delta.shape[-2] * delta.shape[-1]
    rows = delta.numel() // n
    normal = torch.randn(rows, n, generator=generator, device=delta.device)
    if use_kernel is None:
        use_kernel = _kernel_device(delta) and kernel_path(rows, n)
    if use_kernel and triton is None:
        raise RuntimeError("use_kernel=True needs triton >= 3.2")
    return _rbgm_kernel_launch(delta, normal) if use_kernel else rbgm_reference(delta, normal)
