import json
import os
import sys

import torch

# The device the Triton kernels run on in the tests, chosen here only: compiled, on CUDA, when there is
# a GPU (and TRITON_INTERPRET is not on); else under Triton's interpreter on the CPU. A compiled kernel
# cannot read CPU tensors nor the interpreter CUDA ones, so the device and the flag are chosen together,
# before triton is imported, and every launch is checked against them (fixture kernel_launches).
# ADDT_KERNEL_TEST_DEVICE=meta is the dry run of a CUDA machine on a CPU (test_kernels_compile.py): the
# interpreter stays off, kernel tests put their tensors on "meta" (no data), and launches are checked and
# logged (ADDT_KERNEL_LAUNCH_LOG), not run.
if os.environ.get("ADDT_KERNEL_TEST_DEVICE") == "meta":
    os.environ.pop("TRITON_INTERPRET", None)
    KERNEL_DEVICE = "meta"
elif torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "").lower() not in ("1", "true", "on"):
    KERNEL_DEVICE = "cuda"
else:
    os.environ["TRITON_INTERPRET"] = "1"
    KERNEL_DEVICE = "cpu"
# The test models are tiny: one thread per process avoids OpenMP threads spinning against each other
# when several processes (torchrun tests) share the 2 cores; subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import socket  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "kernel: the test must launch a Triton kernel (on kernel_device)")
    config.addinivalue_line("markers", "compiles: runs torch.compile end to end (a minute or more per test on the "
                                       "CPU): runs where CUDA is (the GPU check) or with ADDT_COMPILE_TESTS=1")


@pytest.fixture(scope="session")
def kernel_device():
    """Where kernel tests put the tensors they hand to a kernel: "cuda", "cpu" (interpreter) or "meta" (dry run)."""
    return KERNEL_DEVICE


@pytest.fixture(scope="session")
def kernel_generator():
    """kernel_generator(seed): a generator on kernel_device (None in the dry run: meta has none)."""
    return lambda seed: None if KERNEL_DEVICE == "meta" else torch.Generator(KERNEL_DEVICE).manual_seed(seed)


class _CheckedKernel:
    """Stands in for a Triton kernel: kernel[grid](*args) records the device types of the tensor
    arguments, asserts they are [KERNEL_DEVICE], then launches (in the dry run: nothing to compute)."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            devices = sorted({a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)})
            self.launches.append([self.name, devices])
            assert devices == [KERNEL_DEVICE], f"{self.name} got tensors on {devices}, kernels run on {KERNEL_DEVICE}"
            return None if KERNEL_DEVICE == "meta" else self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture(autouse=True)
def kernel_launches(request, monkeypatch):
    """Every launch of a kernel of kernels/ (modules loaded by addt_common.load_kernel) goes through
    _CheckedKernel; a test marked `kernel` must launch at least one. Returns the list of launches."""
    launches = []
    if "triton" in sys.modules:
        from triton.runtime.interpreter import InterpretedFunction  # no KernelInterface before Triton 3.5
        from triton.runtime.jit import KernelInterface
        for name, module in list(sys.modules.items()):
            if name.startswith("addt_kernels."):
                for attr, fn in list(vars(module).items()):
                    if isinstance(fn, (KernelInterface, InterpretedFunction)):
                        monkeypatch.setattr(module, attr, _CheckedKernel(fn, attr, launches))
    yield launches
    if os.environ.get("ADDT_KERNEL_LAUNCH_LOG"):
        with open(os.environ["ADDT_KERNEL_LAUNCH_LOG"], "a") as f:
            f.write(json.dumps({"test": request.node.nodeid, "kernel": bool(request.node.get_closest_marker("kernel")),
                                "device": KERNEL_DEVICE, "interpret": os.environ.get("TRITON_INTERPRET"),
                                "launches": launches}) + "\n")
    if request.node.get_closest_marker("kernel"):
        assert launches, "a test marked kernel launched no kernel"


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


@pytest.fixture(scope="session")
def checkpointed_grads_exact():
    """check(loss, x, seeds): loss(x, grad_checkpoint) gives the same input gradient with and without
    checkpointing, and in float64 that gradient matches central differences along one random direction
    per seed."""
    def check(loss, x, seeds):
        grads = []
        for ckpt in (False, True):
            xg = x.clone().requires_grad_(True)
            grads.append(torch.autograd.grad(loss(xg, ckpt), xg)[0])
        assert grads[0].abs().max() > 0
        assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[0].abs().max()
        if x.dtype == torch.float64:
            h = 1e-4
            with torch.no_grad():
                for seed in seeds:
                    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
                    fd = (loss(x + h * d, False) - loss(x - h * d, False)) / (2 * h)
                    torch.testing.assert_close((grads[1] * d).sum(), fd, rtol=1e-6, atol=0)
    return check


def pytest_collection_modifyitems(config, items):
    """torch.compile tests run on CUDA machines (bench.py --gpu-check runs them) or when asked for."""
    if torch.cuda.is_available() or os.environ.get("ADDT_COMPILE_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="compiles on the CPU for minutes: runs in the GPU check, or ADDT_COMPILE_TESTS=1")
    for item in items:
        if item.get_closest_marker("compiles"):
            item.add_marker(skip)
