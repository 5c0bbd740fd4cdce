import os
import sys

import torch

# Triton kernels run under the interpreter on CPU; the variable must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The test models are tiny: one thread per process avoids OpenMP threads spinning against each other
# when several processes (torchrun tests) share the 2 cores; subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import socket  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def smoke_inputs(tmp_path_factory):
    """The tiny UNet, classifier and generated images of attack.py's smoke preset, made once."""
    from attack import make_smoke_inputs
    return make_smoke_inputs(str(tmp_path_factory.mktemp("smoke")))


@pytest.fixture
def torchrun():
    """run(script, *args): the script in 2 gloo processes on the CPU (cwd = repo root), finished."""
    def run(script, *args, timeout=300):
        for _ in range(3):  # a free port can be taken by another process before torchrun binds it
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                   str(script), *map(str, args)]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            if "address already in use" not in proc.stderr.lower():
                return proc
        return proc
    return run


@pytest.fixture
def killed_at(monkeypatch):
    """killed_at(module, name, n): the n-th call of module.name raises KeyboardInterrupt, as a kill at that
    point would stop the run; returns a function that puts the real one back."""
    def arm(module, name, n):
        real, calls = getattr(module, name), []

        def dying(*a, **k):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(module, name, dying)
        return lambda: monkeypatch.setattr(module, name, real)
    return arm


def pytest_configure(config):
    config.addinivalue_line("markers", "compiles: runs torch.compile end to end (a minute or more per test on the "
                                       "CPU): runs where CUDA is (the GPU check) or with ADDT_COMPILE_TESTS=1")


def pytest_collection_modifyitems(config, items):
    """torch.compile tests run on CUDA machines (bench.py --gpu-check runs them) or when asked for."""
    if torch.cuda.is_available() or os.environ.get("ADDT_COMPILE_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="compiles on the CPU for minutes: runs in the GPU check, or ADDT_COMPILE_TESTS=1")
    for item in items:
        if item.get_closest_marker("compiles"):
            item.add_marker(skip)
