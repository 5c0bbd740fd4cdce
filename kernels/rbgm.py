"""Rank-Based Gaussian Mapping (RBGM, paper section 5.1) for a batch of perturbations.

Every (image, channel) row of H*W elements of `delta` is replaced by a sorted standard-Gaussian
row in the rank order of the input: the element with the k-th smallest value gets the k-th
smallest Gaussian value, so each output row is an exact permutation of a N(0, 1) sample.

Rank order (kernel and reference agree exactly): values are compared as float32 through the
order-preserving integer key below, ties are broken by position (lower flat index = lower rank).
Under that key -0.0 ranks just below +0.0, a NaN with the sign bit clear ranks above +inf and one
with the sign bit set below -inf. float64 inputs are rounded to float32 first (may create ties).
"""
import torch

try:  # triton is optional: the reference path must work without it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_ROW = 4096  # 64x64 (Tiny-ImageNet); one row is sorted in registers by one program


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
        key = tl.sort(key)
        idx = (key & 0x7FFFFFFF).to(tl.int32)  # argsort: position of the k-th smallest element
        g = tl.load(normal_ptr + row * n + offs, mask=mask)
        tl.store(out_ptr + row * n + idx, g, mask=mask)


def _rbgm_kernel_launch(delta, sorted_normal):
    n = delta.shape[-2] * delta.shape[-1]
    if n > MAX_ROW:
        raise ValueError(f"RBGM kernel handles rows of at most {MAX_ROW} elements, got {n}")
    x = delta.contiguous()
    normal = sorted_normal.to(torch.float32).contiguous()
    out = torch.empty(delta.shape, dtype=torch.float32, device=delta.device)
    block = triton.next_power_of_2(n)
    _rbgm_kernel[(x.numel() // n,)](x, normal, out, n, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return out


def _order_key(x):
    """The kernel's order-preserving int32 key of x rounded to float32."""
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def rbgm_reference(delta, sorted_normal):
    """Plain torch: stable argsort of each row, then scatter the sorted sample into rank order."""
    n = delta.shape[-2] * delta.shape[-1]
    idx = torch.argsort(_order_key(delta.reshape(-1, n)), dim=1, stable=True)
    out = torch.empty(idx.shape, dtype=torch.float32, device=delta.device)
    out.scatter_(1, idx, sorted_normal.to(torch.float32).reshape(idx.shape))
    return out.view(delta.shape)


def sorted_normal_rows(rows, n, generator=None, device=None):
    """(rows, n) float32, each row a sorted N(0, 1) sample, drawn without a sort.

    Cumulative sums of n+1 Exp(1) spacings give uniform order statistics U_(k) = S_k / S_{n+1};
    ndtri maps them to normal order statistics. float64 keeps U strictly inside (0, 1) for n up
    to millions; the clamp only guards the probability-zero extremes that would give +-inf.
    """
    e = torch.empty(rows, n + 1, dtype=torch.float64, device=device).exponential_(generator=generator)
    s = e.cumsum(dim=1)
    u = (s[:, :n] / s[:, n:]).clamp_(torch.finfo(torch.float64).tiny, 1.0 - torch.finfo(torch.float64).eps)
    return torch.special.ndtri(u).to(torch.float32)  # monotone maps: rows stay sorted


def rbgm(delta, generator=None, use_kernel: bool | None = None):
    """RBGM of delta (N, C, H, W): float32 of delta's shape, fresh Gaussian sample per row."""
    n = delta.shape[-2] * delta.shape[-1]
    normal = sorted_normal_rows(delta.numel() // n, n, generator=generator, device=delta.device)
    if use_kernel is None:
        use_kernel = triton is not None and delta.is_cuda and n <= MAX_ROW
    if use_kernel and triton is None:
        raise RuntimeError("use_kernel=True needs triton")
    return _rbgm_kernel_launch(delta, normal) if use_kernel else rbgm_reference(delta, normal)
