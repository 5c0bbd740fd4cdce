"""addt_common.py: keyed seeds, keyed noise, atomic writes, refusing to overwrite a run."""
import os

import pytest
import torch

from addt_common import UserError, atomic_save, keyed_normal, refuse_overwrite, sample_seed, write_json


def test_sample_seed_is_a_pure_function_of_its_key():
    assert sample_seed(0, 5, 1) == sample_seed(0, 5, 1)
    assert len({sample_seed(0, i, s) for i in range(50) for s in range(4)}) == 200
    assert 0 <= sample_seed(2 ** 40, 3) < 2 ** 63


def test_keyed_noise_does_not_depend_on_its_neighbours():
    a = keyed_normal([11, 22, 33], 0, (3, 4), "cpu")
    b = keyed_normal([33, 11], 0, (3, 4), "cpu")
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, keyed_normal([11, 22, 33], 1, (3, 4), "cpu"))  # the draw index is part of the key


def test_keyed_noise_is_standard_normal():
    """Moments, neighbour and draw-to-draw correlation and a Kolmogorov-Smirnov distance of 1e6 samples
    (bounds about 5 standard errors: a broken hash or Box-Muller fails them by orders of magnitude)."""
    z = keyed_normal(list(range(1000)), 3, (1000,), "cpu").flatten().double()
    w = keyed_normal(list(range(1000)), 4, (1000,), "cpu").flatten().double()
    assert abs(z.mean()) < 5e-3 and abs(z.var() - 1) < 7e-3 and abs((z ** 3).mean()) < 1.5e-2
    assert abs((z ** 4).mean() - 3) < 0.05
    assert abs((z[1:] * z[:-1]).mean()) < 5e-3 and abs((z * w).mean()) < 5e-3
    s = z.sort().values
    cdf = 0.5 * (1 + torch.erf(s / 2 ** 0.5))
    ks = (torch.arange(1, len(s) + 1, dtype=torch.float64) / len(s) - cdf).abs().max()
    assert ks < 2e-3


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    atomic_save({"x": torch.arange(3)}, str(tmp_path / "sub" / "a.pt"))
    write_json(str(tmp_path / "b.json"), {"k": 1})
    assert torch.equal(torch.load(tmp_path / "sub" / "a.pt", weights_only=True)["x"], torch.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["b.json", "sub"] and os.listdir(tmp_path / "sub") == ["a.pt"]


def test_refuse_overwrite(tmp_path):
    path = tmp_path / "ckpt.pt"
    refuse_overwrite(str(path), resume=False)  # nothing there yet
    path.write_text("x")
    refuse_overwrite(str(path), resume=True)
    with pytest.raises(UserError, match="--resume"):
        refuse_overwrite(str(path), resume=False)
