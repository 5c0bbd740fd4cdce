"""Every Triton kernel configuration the wrappers can launch, compiled ahead of time for sm_80 (A100)
and sm_90 (H100) on a machine without a GPU: each must compile and must not spill registers.

    python -m pytest -s tests/test_kernels_compile.py   # -s shows the table of registers
    python tests/test_kernels_compile.py                # the JSON report alone

Compilation runs in one subprocess with TRITON_INTERPRET removed (conftest.py sets it for the
interpreter tests) and a fresh cache, so every run really compiles. Without a GPU
CompiledKernel.n_regs / n_spills do not exist: triton reads them from the CUDA driver after loading
the module (n_spills = CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4). The driver takes them from the
cubin, and cuobjdump --dump-resource-usage (shipped with triton, like ptxas) prints the same REG and
LOCAL, so spills are read there.

Specialisation is the one the JIT picks for real data: 16-byte-aligned pointers (fresh torch
tensors) and the row / per-sample length divisible by 16 (32x32 and 64x64 images) when BLOCK >= 16.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP32, BF16 = "*fp32", "*bf16"
ARCHS = (80, 90)
sys.path.insert(0, REPO)
from addt_common import load_kernel  # noqa: E402

rbgm_mod = load_kernel("rbgm")


def configs():
    """[(id, kernel, arch, signature, constexprs, num_warps)], mirroring the wrappers' launches."""
    out = []
    for arch in ARCHS:
        # _rbgm_kernel_launch: BLOCK = max(2, next_power_of_2(H*W)) for any row of 1..MAX_ROW elements
        for delta in (FP32, BF16):
            for k in range(1, rbgm_mod.MAX_ROW.bit_length()):
                block = 2 ** k
                warps = rbgm_mod._num_warps(block)
                sig = {"delta_ptr": delta, "normal_ptr": FP32, "out_ptr": FP32, "n": "i32", "BLOCK": "constexpr"}
                out.append((f"rbgm-sm{arch}-delta_{delta[1:]}-BLOCK{block}-w{warps}",
                            "rbgm", arch, sig, {"BLOCK": block}, warps))
        # FusedStep: x_t, eps each fp32 or bf16 (eps bf16 from an autocast UNet); z absent or either
        # dtype; an absent z / gz pointer is passed x_t / gx. Coefficients: one fp32 tensor, the (6, N)
        # table (per sample: PER_SAMPLE 1, coef_stride N) or the samplers' (6,) vector (PER_SAMPLE 0,
        # coef_stride 1, which the JIT turns into a constant). out, gx in x_t's dtype, geps in eps's, gz
        # in z's; g (the gradient of out) in x_t's. BLOCK = min(1024, next_pow2(numel)).
        for x in (FP32, BF16):
            for eps in (FP32, BF16):
                for z in (None, FP32, BF16):
                    for block, per_sample in _step_variants(x, eps, z):
                        tag = (f"sm{arch}-x_{x[1:]}-eps_{eps[1:]}-z_{z[1:] if z else 'none'}-"
                               f"{'table' if per_sample else 'vector'}-BLOCK{block}-w4")
                        stride = {"coef_stride": "i32"} if per_sample else {"coef_stride": "constexpr"}
                        consts = {"PER_SAMPLE": per_sample, "BLOCK": block, **({} if per_sample else {"coef_stride": 1})}
                        fwd = {"x_ptr": x, "eps_ptr": eps, "z_ptr": z or x, "coef_ptr": FP32, "out_ptr": x,
                               "numel": "i32", **stride, "HAS_Z": "constexpr", "PER_SAMPLE": "constexpr",
                               "BLOCK": "constexpr"}
                        out.append((f"step_fwd-{tag}", "step_fwd", arch, fwd, {"HAS_Z": z is not None, **consts}, 4))
                        bwd = {"g_ptr": x, "x_ptr": x, "eps_ptr": eps, "coef_ptr": FP32, "gx_ptr": x,
                               "geps_ptr": eps, "gz_ptr": z or x, "numel": "i32", **stride,
                               "HAS_GZ": "constexpr", "PER_SAMPLE": "constexpr", "BLOCK": "constexpr"}
                        out.append((f"step_bwd-{tag}", "step_bwd", arch, bwd, {"HAS_GZ": z is not None, **consts}, 4))
    return out


def _step_variants(x, eps, z):
    """(BLOCK, PER_SAMPLE): 1024 (every image of >= 1024 values per sample) for all dtypes, with the table and
    the vector; the smaller BLOCKs of tiny inputs only for all-fp32 with z and the table: per thread they hold
    fewer values, so cannot spill where 1024 doesn't."""
    small = [(2 ** k, 1) for k in range(10)] if (x, eps, z) == (FP32, FP32, FP32) else []
    return small + [(1024, 1), (1024, 0)]


def compile_all():
    """Compile every configuration (ptxas runs as a subprocess, so threads overlap); returns
    {id: {"regs", "spills", "local_bytes", "shared_bytes"} or {"error"}}."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    step = load_kernel("ddpm_step")
    kernels = {"rbgm": rbgm_mod._rbgm_kernel, "step_fwd": step._step_fwd_kernel, "step_bwd": step._step_bwd_kernel}
    cuobjdump = knobs.nvidia.cuobjdump.path

    def one(cfg):
        name, kernel, arch, sig, constexprs, num_warps = cfg
        aligned = [i for i, (k, v) in enumerate(sig.items())
                   if v.startswith("*") or (k in ("n", "numel") and constexprs["BLOCK"] >= 16)]
        src = ASTSource(kernels[kernel], sig, constexprs, attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        except Exception as e:  # report it in the table, do not stop the others
            return name, {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        path = os.path.join(tmp, name + ".cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        regs, local, shared = (int(re.search(rf"\b{k}:(\d+)", usage).group(1)) for k in ("REG", "LOCAL", "SHARED"))
        return name, {"regs": regs, "spills": local // 4, "local_bytes": local, "shared_bytes": shared}

    todo = sorted(configs(), key=lambda c: (-c[4]["BLOCK"], c[2]))  # the slow big sorts first
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(2, os.cpu_count())) as pool:
        return dict(pool.map(one, todo))


CONFIGS = configs()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    proc = subprocess.run([sys.executable, "-W", "ignore", os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    path = tmp_path_factory.mktemp("kernels") / "kernel_registers.json"
    path.write_text(json.dumps(got, indent=1))
    print(f"\n{'configuration':60s} {'regs':>5s} {'spills':>6s}")
    for name, *_ in CONFIGS:
        r = got[name]
        print(f"{name:60s} {r.get('regs', '-'):>5} {r.get('spills', r.get('error', '')):>6}")
    print(f"report: {path}")
    return got


@pytest.mark.parametrize("name", [c[0] for c in CONFIGS])
def test_compiles_without_spills(report, name):
    r = report[name]
    assert "error" not in r, r["error"]
    assert r["spills"] == 0 and r["local_bytes"] == 0, r


needs_triton = pytest.mark.skipif(rbgm_mod.triton is None, reason="triton not installed")


@needs_triton
def test_kernel_device_matches_interpreter(kernel_device):
    """conftest.py's one choice: the kernels are interpreted exactly when the kernel tests put their tensors
    on the CPU, and compiled (for CUDA, which must be there) otherwise."""
    from triton.runtime.interpreter import InterpretedFunction
    step = load_kernel("ddpm_step")
    kernels = [getattr(k, "kernel", k)  # inside a test each is wrapped by conftest's kernel_launches
               for k in (rbgm_mod._rbgm_kernel, step._step_fwd_kernel, step._step_bwd_kernel)]
    assert kernel_device in ("cpu", "cuda")
    assert all(isinstance(k, InterpretedFunction) == (kernel_device == "cpu") for k in kernels)
    assert (os.environ.get("TRITON_INTERPRET") == "1") == (kernel_device == "cpu")
    assert kernel_device == "cpu" or torch.cuda.is_available()


@needs_triton
def test_kernel_tests_dry_run_as_on_a_gpu(tmp_path):
    """The kernel tests as a CUDA machine runs them, here: with ADDT_KERNEL_TEST_DEVICE=meta conftest.py
    leaves the interpreter off and makes kernel_device "meta" (standing in for "cuda": a device that is
    not the CPU; it holds no data). Every test marked kernel must reach its launches with all tensor
    arguments on that device (one that handed a CPU tensor to a compiled kernel, as in issue 18, fails
    here). Launches are checked, not run, so those tests then fail on reading their outputs, and only
    there; every other test (references and CPU fallbacks) must pass and launch nothing."""
    import xml.etree.ElementTree as ET
    log, junit = tmp_path / "launches.jsonl", tmp_path / "junit.xml"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(ADDT_KERNEL_TEST_DEVICE="meta", ADDT_KERNEL_LAUNCH_LOG=str(log))
    files = ["tests/test_rbgm.py", "tests/test_ddpm_step.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           *files], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {r["test"]: r for r in map(json.loads, log.read_text().splitlines())}
    results = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
        results[f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}"] = bad
    assert set(records) == set(results) and len(results) >= 30  # every test ran through the launch check
    kernel_tests = [t for t, r in records.items() if r["kernel"]]
    assert len(kernel_tests) >= 20
    for test, r in records.items():
        assert r["device"] == "meta" and r["interpret"] is None, r
        if r["kernel"]:
            assert r["launches"] and all(devices == ["meta"] for _, devices in r["launches"]), r
            assert len(results[test]) == 1 and "Cannot copy out of meta tensor" in results[test][0].get("message"), \
                (test, [(b.tag, b.get("message")) for b in results[test]])
        else:
            assert not r["launches"] and not results[test], (test, r, [b.get("message") for b in results[test]])


if __name__ == "__main__":
    assert "TRITON_INTERPRET" not in os.environ, "the interpreter would replace compilation"
    print(json.dumps(compile_all()))
