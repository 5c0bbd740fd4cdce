"""addt_common.py: keyed seeds, keyed noise, atomic writes, refusing to overwrite a run."""
import os

import pytest
import torch

from addt_common import UserError, atomic_save, randn_keyed, refuse_overwrite, sample_seed, write_json


def test_sample_seed_is_a_pure_function_of_its_key():
    assert sample_seed(0, 5, 1) == sample_seed(0, 5, 1)
    assert len({sample_seed(0, i, s) for i in range(50) for s in range(4)}) == 200
    assert 0 <= sample_seed(2 ** 40, 3) < 2 ** 63


def test_keyed_noise_does_not_depend_on_its_neighbours():
    a = randn_keyed([11, 22, 33], (3, 4), "cpu")
    b = randn_keyed([33, 11], (3, 4), "cpu")
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])


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
