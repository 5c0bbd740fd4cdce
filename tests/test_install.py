"""A user's environment: the PyPI package `kernels` (which transformers 5 requires) beside our `kernels/`
folder. Our kernels are loaded by path as `addt_kernels.*`, so both coexist in one process, and the scripts
run there; the smoke preset re-checks an install each time it is run."""
import ast
import os
import subprocess
import sys

import pytest

import attack
from addt_common import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPI_KERNELS = '''"""Stand-in for the PyPI package `kernels` (a regular package, as pip installs it)."""
__version__ = "0.19.1"
class CUDAProperties:
    pass
'''


def sources():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "data", "__pycache__")]
        yield from (os.path.join(root, f) for f in files if f.endswith(".py"))


def test_nothing_imports_our_kernels_by_the_name_kernels():
    assert not os.path.exists(os.path.join(REPO, "kernels", "__init__.py"))  # never a regular package
    found = []
    for path in sources():
        for node in ast.walk(ast.parse(open(path).read(), path)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{os.path.relpath(path, REPO)}:{node.lineno}" for n in names if n.split(".")[0] == "kernels"]
    assert not found, found


@pytest.fixture(scope="module")
def user_env(tmp_path_factory):
    """Environment variables of a process whose `kernels` is the PyPI package, run from the repository root
    (where our kernels/ folder lies first on sys.path)."""
    site = tmp_path_factory.mktemp("site")
    os.makedirs(site / "kernels")
    (site / "kernels" / "__init__.py").write_text(PYPI_KERNELS)
    return {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}


def run(argv, env, timeout=300):
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_pypi_kernels_and_ours_in_one_process(user_env):
    code = ("import addt_diffusion, train_addt, bench\n"
            "from addt_common import load_kernel\n"
            "import kernels\n"
            "assert kernels.CUDAProperties and kernels.__version__ == '0.19.1', kernels.__file__\n"
            "for name in ('rbgm', 'ddpm_step'):\n"
            "    m = load_kernel(name)\n"
            "    assert m.__file__ == f'{os.getcwd()}/kernels/{name}.py', m.__file__\n"
            "print('ok')\n")
    assert run(["-c", "import os\n" + code], user_env).stdout.strip() == "ok"


def test_transformers_and_diffusers_import_after_our_modules():
    """The order that failed with transformers 5 (our modules first, then the oracles), with whatever
    `kernels` this environment has installed."""
    code = ("import addt_diffusion, train_addt\n"
            "from diffusers import UNet2DModel\n"
            "from transformers import ViTForImageClassification\n"
            "import transformers.integrations.hub_kernels\n"
            "print('ok')\n")
    assert run(["-c", code], {**os.environ, "OMP_NUM_THREADS": "1"}).stdout.strip() == "ok"


def test_scripts_run_beside_pypi_kernels(user_env, tmp_path):
    """The smoke preset (every family and setting), then purify.py and train_addt.py on its models."""
    out = tmp_path / "smoke"
    proc = run(["attack.py", "--preset", "smoke", "--out", str(out)], user_env)
    assert "smoke preset finished" in proc.stdout
    table = proc.stdout.split("smoke test (")[1]
    rows = [line.split(" | ")[:3] for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    done = {(defense.strip("| "), setting.replace("-3", "")) for defense, _, setting in rows}  # dw-semi-3: 3 sets
    assert {(f, s) for f in ("ddpm", "vpsde", "edm", "gdmp") for s in attack.SETTINGS} | {("none", "white-box")} <= done
    assert "AA-rand-fixed" in table and " l2 |" in table
    inputs = {k: str(out / "smoke-inputs" / v) for k, v in
              {"data": "images.zip", "classifier": "classifier.pt", "ddpm": "unet"}.items()}
    run(["purify.py", "--ddpm", inputs["ddpm"], "--classifier", inputs["classifier"], "--data", inputs["data"],
         "--nfe", "5", "--n", "4", "--device", "cpu", "--out", str(tmp_path / "purify")], user_env)
    assert (tmp_path / "purify" / "results.json").is_file()
    run(["train_addt.py", "--ddpm", inputs["ddpm"], "--classifier", inputs["classifier"], "--data", inputs["data"],
         "--global-batch", "4", "--max-steps", "2", "--device", "cpu", "--out", str(tmp_path / "addt")], user_env)
    assert (tmp_path / "addt" / "ema" / "unet").is_dir()


# ---------------------------------------------------------------- the smoke preset starts fresh

def test_smoke_folder_is_fresh_unless_resumed(tmp_path, capsys):
    out = tmp_path / "smoke"
    (out / "smoke-inputs").mkdir(parents=True)
    (out / "smoke-ddpm-white-box-linf").mkdir()
    (out / "smoke-inputs" / "classifier.pt").write_text("old")
    attack.fresh_smoke_folder(str(out), resume=True)
    assert (out / "smoke-inputs" / "classifier.pt").exists()  # --resume continues
    attack.fresh_smoke_folder(str(out), resume=False)
    assert sorted(os.listdir(out)) == [".lock"]  # every earlier smoke result is gone: all is recomputed
    assert "replacing the earlier smoke results" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="did not write"):  # another run's results are never touched
        attack.fresh_smoke_folder(str(tmp_path / "other"), resume=False)
    assert (tmp_path / "other" / "summary.json").exists()


def test_smoke_preset_flags():
    assert attack.parse_args(["--preset", "smoke"]).out == attack.SMOKE_OUT
    assert attack.parse_args(["--preset", "smoke", "--resume", "--out", "x"]).resume
    with pytest.raises(UserError, match="takes only"):
        attack.parse_args(["--preset", "smoke", "--eps", "0.1"])


def test_ci_runs_the_readmes_setup_and_pytest_commands():
    """.ci/run reads its setup and test commands from the README: they are the README's lines, and the
    test command is the pytest run."""
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    extract = ci[ci.index("readme_command() {"):ci.index("\nvenv=")]  # the function, both calls, the pytest check
    script = f'set -euo pipefail\ncd "{REPO}"\n{extract}\nprintf "%s\\n%s\\n" "$setup" "$tests"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    setup, tests = out.splitlines()
    readme = open(os.path.join(REPO, "README.md")).read().splitlines()
    assert any(line.startswith(setup) and line.rstrip().endswith("# setup") for line in readme)
    assert tests.split() == ["python", "-m", "pytest", "-q", "tests"]
