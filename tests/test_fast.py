"""The fast path and its memory decisions (issue 18): the checkpoint decision and the auto chunk are those
of the eager networks whatever the compilation, selective checkpointing gives plain autograd's
gradients, --fast resolves to the settings it stands for (attack.py, purify.py, analyze.py,
train_addt.py) and records them, and --chunk auto is kept by --resume. The tests marked `compiles` run
torch.compile end to end: on CUDA (the GPU check runs this file) or with ADDT_COMPILE_TESTS=1."""
import copy
import json
import os

import pytest
import torch
from torch._dynamo.eval_frame import OptimizedModule

import addt_attacks
import attack
import purify
import train_addt
from addt_attacks import ATTACK, Defense, fit_chunk
from addt_common import UserError, eager_module, prepare_model, resolve_precision
from addt_diffusion import ddpm_purifier, edm_purifier, make_schedule, new_diffusion_model, vpsde_purifier
from models import build_classifier
from models.unet import UNet

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# bytes autograd saves for the gradient of the smoke UNet (NFE 5) + WRN-10-1 on 2 images x EoT 2, eager:
# the number the issue measured (a compiled model showed 312,832 to the old hook-based count)
SMOKE_GRAPH_BYTES = 109_233_152


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return UNet(attack.TINY_UNET_CONFIG).eval(), build_classifier("wrn-10-1", 10).eval()


def defense(nets, compile=False, **kw):
    unet, clf = (prepare_model(copy.deepcopy(m), DEVICE, compile=compile) for m in nets)
    return Defense(ddpm_purifier(unet, make_schedule("ddpm", 5)), clf, **kw)


def probe(n=2, eot=2):
    """x and pipes of n images x eot draws, as eot_gradient lays them out."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, 32, 32, generator=g).to(DEVICE)
    return x.repeat(eot, 1, 1, 1), [(i, 0, d) for d in range(eot) for i in range(n)]


# ---------------------------------------------------------------- memory decisions under compile

def test_memory_estimate_and_auto_decision_are_the_eager_ones_under_compile(nets, monkeypatch):
    """A compiled Defense measures its eager modules: the same bytes, hence the same 'auto' decision, at
    any free memory (no compiled code runs: memory_estimate uses eager_module)."""
    x, pipes = probe()
    eager, compiled = defense(nets, chunk=4), defense(nets, compile=True, chunk=4)
    assert isinstance(compiled.purifier.model, OptimizedModule) and isinstance(compiled.classifier, OptimizedModule)
    est = eager.memory_estimate(x, pipes, ATTACK, 2)
    assert compiled.memory_estimate(x, pipes, ATTACK, 2) == est
    if DEVICE.type == "cpu":  # CUDA's kernels (cuDNN, flash attention) save other tensors
        assert 4 * est["off"] == SMOKE_GRAPH_BYTES
    assert est["calls"] == 6  # NFE 5 visits t = 100, 80, ..., 0
    assert est["on"] < est["selective"] < est["off"]
    for free, on in [(2 * 4 * est["off"] - 1, True), (2 * 4 * est["off"] + 1, False)]:
        monkeypatch.setattr(addt_attacks, "available_memory", lambda device: free)
        for d in (defense(nets, chunk=4), defense(nets, compile=True, chunk=4)):
            d.decide_checkpoint(x, pipes, ATTACK, 2)
            assert d.checkpoint_info["on"] is on and d.checkpoint_info["saved_bytes_per_chunk"] == 4 * est["off"]
    assert isinstance(compiled.purifier.model, OptimizedModule)  # back in place after the estimate


def test_fit_chunk():
    assert fit_chunk(100, 2 * 100 * 50, 4096) == 50
    assert fit_chunk(100, 2 * 100 * 1000, 4096) == 960  # a multiple of 64 from 128 on
    assert fit_chunk(100, 10 ** 15, 4096) == 4096 and fit_chunk(100, None, 64) == 64
    assert fit_chunk(10 ** 12, 1000, 64) == 1  # nothing fits: one pipeline at a time, never 0


def test_auto_chunk_is_sized_once_and_gives_the_fixed_chunks_numbers(nets, monkeypatch):
    """--chunk auto on the CPU: at most AUTO_CHUNK_MAX['cpu'], here the memory given for 5 pipelines; the
    gradients equal those of the same chunk given explicitly."""
    x, pipes = probe(3, 2)
    y = torch.tensor([1, 2, 3], device=DEVICE)
    est = defense(nets).memory_estimate(x[:2], pipes[:2], ATTACK, 2)
    monkeypatch.setattr(addt_attacks, "available_memory", lambda device: int(2 * 5.5 * est["on"]))
    auto = defense(nets, chunk="auto", grad_checkpoint="on")
    g_auto = auto.eot_gradient(x[:3], y, [0, 1, 2], 0, 2)[0]
    assert auto.chunk == 5 and auto.chunk_info["request"] == "auto" and auto.chunk_info["sized_for_checkpoint"] == "on"
    monkeypatch.setattr(addt_attacks, "available_memory", lambda device: 10 ** 15)
    auto.eot_gradient(x[:3], y, [0, 1, 2], 1, 2)
    assert auto.chunk == 5  # sized once
    assert torch.equal(g_auto, defense(nets, chunk=5, grad_checkpoint="on").eot_gradient(x[:3], y, [0, 1, 2], 0, 2)[0])
    big = defense(nets, chunk="auto")
    big.predict(x[:3], [0, 1, 2], addt_attacks.EVAL)
    assert big.chunk == addt_attacks.AUTO_CHUNK_MAX[DEVICE.type] and big.checkpointing is False  # the graph fits


# ---------------------------------------------------------------- selective checkpointing

def family_defenses(family):
    torch.manual_seed(0)
    clf = build_classifier("wrn-10-1", 10).eval().requires_grad_(False)
    if family == "ddpm":
        net = UNet(attack.TINY_UNET_CONFIG)
        make = lambda n: ddpm_purifier(n, make_schedule("ddpm", 5))  # noqa: E731
    elif family == "vpsde":
        net = new_diffusion_model("vpsde", attack.TINY_VPSDE_CONFIG)
        make = lambda n: vpsde_purifier(n, dt=0.025)  # noqa: E731  (4 Euler steps)
    else:
        net = new_diffusion_model("edm", attack.TINY_EDM_CONFIG)
        make = lambda n: edm_purifier(n, num_steps=3)  # noqa: E731
    net = net.eval().requires_grad_(False)
    return {mode: Defense(make(net), clf, chunk=4, grad_checkpoint=mode) for mode in (False, True, "selective")}


@pytest.mark.parametrize("family", ["ddpm", "vpsde", "edm"])
def test_selective_checkpointing_gives_autograds_gradient(family):
    x, _ = probe(2, 1)
    y = torch.tensor([3, 7])
    grads = {mode: d.eot_gradient(x.cpu(), y, [0, 1], 0, 2)[0] for mode, d in family_defenses(family).items()}
    assert grads[False].abs().sum() > 0
    assert torch.allclose(grads["selective"], grads[False], rtol=1e-5, atol=1e-7)
    assert torch.allclose(grads[True], grads[False], rtol=1e-5, atol=1e-7)


def test_selective_needs_torch_2_5(monkeypatch, tmp_path):
    """Without torch 2.5's selective-checkpointing API (torch 2.4): --grad-checkpoint selective is one
    error line at parse time, and the Python API refuses the mode at the first gradient."""
    import addt_diffusion
    monkeypatch.setattr(addt_diffusion, "SELECTIVE", False)
    with pytest.raises(UserError, match=r"selective checkpointing needs torch >= 2\.5.*--grad-checkpoint on"):
        attack.parse_args(BASE + ["--out", str(tmp_path / "o"), "--grad-checkpoint", "selective"])
    x, _ = probe(2, 1)
    with pytest.raises(UserError, match="needs torch >= 2.5"):
        family_defenses("ddpm")["selective"].eot_gradient(x.cpu(), torch.tensor([3, 7]), [0, 1], 0, 2)
    assert addt_diffusion.checkpointed(True, torch.sin, torch.ones(2, requires_grad=True)).requires_grad


# ---------------------------------------------------------------- --fast: the flags it stands for

BASE = ["--classifier", "c.pt", "--ddpm", "u"]


def test_fast_flag_resolves_for_the_device(monkeypatch, tmp_path):
    out = ["--out", str(tmp_path / "o")]
    a = attack.parse_args(BASE + out + ["--fast"])
    cuda = torch.cuda.is_available()
    assert (a.precision, a.channels_last, a.compile, a.compile_mode) == (
        "bf16" if cuda else "fp32", True, True, "default")
    assert (a.grad_checkpoint, a.chunk, a.chunk_auto, a.batch_size) == ("on", "auto", True, None)
    plain = attack.parse_args(BASE + out)
    assert (plain.precision, plain.channels_last, plain.compile, plain.grad_checkpoint, plain.chunk) == (
        "fp32", False, False, "auto", 64)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what --fast picks on a GPU
    assert attack.parse_args(BASE + out + ["--fast"]).precision == "bf16"
    over = attack.parse_args(BASE + out + ["--fast", "--precision", "fp32", "--no-compile", "--no-channels-last",
                                           "--grad-checkpoint", "selective", "--chunk", "32"])
    assert (over.precision, over.compile, over.channels_last, over.grad_checkpoint, over.chunk) == (
        "fp32", False, False, "selective", 32)
    ro = attack.parse_args(BASE + out + ["--compile-mode", "reduce-overhead"])
    assert ro.compile and ro.compile_mode == "reduce-overhead" and ro.precision == "fp32"
    for bad, msg in [(["--no-compile", "--compile-mode", "max-autotune"], "compile-mode"),
                     (["--chunk", "many"], "--chunk"), (["--chunk", "0"], "--chunk")]:
        with pytest.raises(UserError, match=msg):
            attack.parse_args(BASE + out + bad)
    p = purify.parse_args(BASE + out + ["--fast"])
    assert (p.precision, p.channels_last, p.compile) == ("bf16", True, True)
    t = train_addt.parse_args(["--ddpm", "u", "--classifier", "c.pt", "--fast"] + out)
    assert (t.precision, t.channels_last, t.compile, t.compile_mode) == ("bf16", True, True, "default")
    assert train_addt.parse_args(["--ddpm", "u", "--classifier", "c.pt"] + out).precision == "fp32"


def test_fast_train_step_modules_share_the_weights(nets):
    """train_addt.step_modules under --fast: one compiled module for CGPO and the update over net's own
    weights (the optimiser and the EMA see the same tensors), channels_last, a frozen compiled classifier."""
    args = train_addt.parse_args(["--init", "scratch", "--classifier", "-", "--fast", "--out", "/tmp/unused-addt"])
    net = copy.deepcopy(nets[0]).train()
    params = [p.data_ptr() for p in net.parameters()]
    model, step_net, clf, amp, precision = train_addt.step_modules(args, net, copy.deepcopy(nets[1]), DEVICE)
    assert model is step_net and isinstance(step_net, OptimizedModule) and eager_module(step_net) is net
    assert [p.data_ptr() for p in step_net.parameters()] == [p.data_ptr() for p in net.parameters()]
    assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and net.training
    assert isinstance(clf, OptimizedModule) and not any(p.requires_grad for p in clf.parameters())
    assert precision == args.precision and params  # in place: same parameter objects


# ---------------------------------------------------------------- attack.py --fast: records and resume

def fast_run(smoke_inputs, out, extra=()):
    return ["--defense", "ddpm", "--ddpm", smoke_inputs["ddpm"], "--classifier", smoke_inputs["classifier"],
            "--data", smoke_inputs["data"], "--nfe", "5", "--n", "5", "--steps", "2", "--eot", "2", "--fast",
            "--no-compile", "--out", str(out), *extra]


def test_fast_attack_records_its_settings_and_resume_keeps_the_auto_chunk(smoke_inputs, tmp_path, monkeypatch,
                                                                         killed_at):
    """attack.py --fast (eager here: compiling takes minutes on the CPU) with --chunk auto sized for 4
    pipelines: the summary and args.json record every resolved setting; a run killed after its first
    batch resumes with a lot more free memory and still uses chunk 4, and its records equal those of
    --chunk 4 given explicitly with another --batch-size."""
    est = {}

    def free(device):  # room for 4.5 pipelines of the per-call-checkpointed graph
        return int(2 * 4.5 * est["on"]) if est else 10 ** 15

    real = Defense.memory_estimate

    def remember(self, *a, **k):
        est.update(real(self, *a, **k))
        return dict(est)

    monkeypatch.setattr(Defense, "memory_estimate", remember)
    monkeypatch.setattr(addt_attacks, "available_memory", free)
    restore = killed_at(attack, "append_jsonl", 2)
    with pytest.raises(KeyboardInterrupt):
        attack.main(fast_run(smoke_inputs, tmp_path / "fast"))
    restore()
    saved = json.loads((tmp_path / "fast" / "args.json").read_text())
    assert saved["chunk"] == 4 and saved["chunk_auto"] and saved["batch_size"] == 2  # chunk / EoT images
    est.clear()  # the resumed run would now size 64
    summary = attack.main(fast_run(smoke_inputs, tmp_path / "fast", ["--resume"]))
    speed = summary["speed"]
    precision = "bf16" if DEVICE.type == "cuda" else "fp32"  # --fast's choice for the device
    assert (speed["fast"], speed["precision"], speed["channels_last"], speed["compile"]) == (
        True, precision, True, False)
    assert (speed["chunk"], speed["grad_checkpoint"], speed["checkpoint_info"]["on"], speed["batch_size"]) == (
        4, "on", True, 2)
    assert summary["args"]["chunk"] == 4
    fixed = attack.main(fast_run(smoke_inputs, tmp_path / "fixed", ["--chunk", "4", "--batch-size", "3"]))
    strip = lambda r: {k: v for k, v in r.items() if k != "run"}  # noqa: E731
    recs = [attack.read_records(str(tmp_path / d)) for d in ("fast", "fixed")]
    assert [strip(recs[0][i]) for i in range(5)] == [strip(recs[1][i]) for i in range(5)]
    assert fixed["robust_accuracy"] == summary["robust_accuracy"]


def test_purify_records_its_speed_settings(smoke_inputs, tmp_path):
    res = purify.main(["--ddpm", smoke_inputs["ddpm"], "--classifier", smoke_inputs["classifier"], "--data",
                       smoke_inputs["data"], "--nfe", "5", "--n", "4", "--grid", "0", "--channels-last",
                       "--out", str(tmp_path / "p")])
    assert res["speed"] == {"fast": False, "precision": "fp32", "channels_last": True, "compile": False}
    assert json.loads((tmp_path / "p" / "results.json").read_text())["speed"]["channels_last"] is True


# ---------------------------------------------------------------- compiled, end to end (GPU check)

@pytest.mark.compiles
def test_compiled_attack_gradient_equals_eager(nets):
    """The --fast attack path (compiled networks, per-call checkpointing, fp32 here) against eager."""
    resolve_precision("fp32", DEVICE)  # strict fp32 (no TF32) on CUDA
    x, _ = probe(2, 1)
    y = torch.tensor([3, 7], device=DEVICE)
    g = [defense(nets, compile=c, chunk=4, grad_checkpoint="on").eot_gradient(x, y, [0, 1], 0, 2)[0]
         for c in (False, True)]
    assert torch.allclose(g[1], g[0], rtol=1e-4, atol=1e-6), (g[1] - g[0]).abs().max()


@pytest.mark.compiles
def test_compiled_train_step_gives_the_eager_update(nets):
    """One ADDT step (CGPO, update, EMA) through train_addt.step_modules, compiled vs eager, fp32 and no
    dropout (the compiled graph draws its own dropout masks): the same loss and the same gradient of every
    weight to float tolerance (the weights after Adam's first step are no test: it moves each weight by
    about lr whatever the size of its gradient, so float noise in a near-zero gradient flips it)."""
    resolve_precision("fp32", DEVICE)  # strict fp32 (no TF32) on CUDA
    results = []
    for fast in ([], ["--compile"]):
        args = train_addt.parse_args(["--init", "scratch", "--classifier", "-", "--dropout", "0", "--out",
                                      "/tmp/unused-addt", "--device", DEVICE.type, *fast])
        torch.manual_seed(0)
        net = copy.deepcopy(nets[0]).to(DEVICE).train().requires_grad_(True)
        opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
        ema = train_addt.EMA(net)
        model, step_net, clf, amp, _ = train_addt.step_modules(args, net, copy.deepcopy(nets[1]), DEVICE)
        g = torch.Generator(device=DEVICE).manual_seed(0)
        x0 = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 2 - 1
        stats = train_addt.train_step(model, step_net, train_addt.DDPM(DEVICE), clf, ema, opt,
                                      [(x0, torch.tensor([0, 1, 2, 3], device=DEVICE))], args, g, amp)
        results.append((stats, [p.grad.clone() for p in net.parameters()]))
    (s0, g0), (s1, g1) = results
    assert abs(s0["loss"] - s1["loss"]) < 1e-4 * abs(s0["loss"]) + 1e-6 and s0["grad_norm"] > 0
    rel = [((b - a).norm() / a.norm().clamp_min(1e-12)).item() for a, b in zip(g0, g1) if a.norm() > 1e-8]
    assert max(rel) < 1e-3, max(rel)


def test_file_is_in_the_gpu_check():
    import bench
    assert os.path.join("tests", os.path.basename(__file__)) in bench.CHECK_TESTS
