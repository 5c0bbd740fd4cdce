"""Classifier families against outputs of the official code, and the input normalisation each gets.

Fixtures (DATA written by the official code; see ../shared/fixtures/README.md sections 3 and 4):
  tests/fixtures/wrn_t7/*            copied from ../shared/fixtures/wrn_t7/ (meliketoy/wide-resnet.pytorch
                                     Wide_ResNet(10, 1, 0.3, 10) pickled whole, zip and legacy formats)
  tests/fixtures/robustbench_dm/*    copied from ../shared/fixtures/robustbench_dm/ (robustbench 1.1.1)
  ../shared/fixtures/robustbench_dm/dm_wrn_16_2.pt is 2.8 MB, so it is read in place.
"""
import builtins
import json
import os

import pytest
import torch
import torch.nn.functional as F

from addt_common import UserError
from models import CIFAR10_MEAN, CIFAR10_STD, Classifier, load_classifier, make_net, parse_norm
from models.dm_wrn import DMWideResNet
from models.wide_resnet import Wide_ResNet

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")
SHARED = os.path.join(HERE, "..", "..", "shared", "fixtures")


def fixture(*parts):
    return os.path.join(FIX, *parts)


def logits(classifier, x):
    with torch.no_grad():
        return classifier(x)


def shapes(entries):
    return {e["key"]: tuple(e["shape"]) for e in entries}


# ---------------------------------------------------------------- RobustBench

def test_dm_wide_resnet_fixture():
    path = os.path.join(SHARED, "robustbench_dm", "dm_wrn_16_2.pt")
    if not os.path.isfile(path):
        pytest.fail(f"{path} is missing: the shared fixtures must lie beside the repository (../shared)")
    out = torch.load(fixture("robustbench_dm", "dm_wrn_16_2_outputs.pt"), weights_only=True)
    classifier = load_classifier(path)
    assert isinstance(classifier.net, DMWideResNet)
    y = logits(classifier, out["x01"])
    torch.testing.assert_close(y, out["logits_swish"], rtol=0, atol=1e-5)
    # Wang2023's nn.SiLU: the same function up to float rounding
    assert (y - out["logits_silu"]).abs().max() <= 1e-5 * out["logits_silu"].abs().max()
    info = classifier.norm_info
    assert info["family"] == "robustbench-dm" and info["name"] == "none" and info["source"] == "default"
    torch.testing.assert_close(torch.tensor(info["net_normalises"]["std"]), out["std"])
    torch.testing.assert_close(torch.tensor(info["net_normalises"]["mean"]), out["mean"])
    assert "mean" not in classifier.net.state_dict()  # normalisation buffers are not persistent, as upstream


def test_dm_wide_resnet_full_size_shapes():
    with open(fixture("robustbench_dm", "full_size_state_dict_shapes.json")) as f:
        want = json.load(f)
    with torch.device("meta"):  # shapes only: no memory, no init
        nets = {"DMWideResNet_70_16": make_net("dm-wrn-70-16", 10), "DMWideResNet_28_10": make_net("dm-wrn-28-10", 10),
                "Standard_WideResNet_28_10": make_net("wrn-28-10", 10)}
    for name, net in nets.items():
        assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes(want[name]["state_dict"]), name
        assert sum(p.numel() for p in net.parameters()) == want[name]["num_parameters"], name


def test_standard_wide_resnet_fixture():
    out = torch.load(fixture("robustbench_dm", "standard_wrn_16_1_outputs.pt"), weights_only=True)
    classifier = load_classifier(fixture("robustbench_dm", "standard_wrn_16_1.pt"))  # {'state_dict': {'module.'...}}
    torch.testing.assert_close(logits(classifier, out["x01"]), out["logits"], rtol=0, atol=1e-5)
    assert classifier.norm_info["family"] == "robustbench" and classifier.norm_info["name"] == "none"


# ---------------------------------------------------------------- wide-resnet.pytorch .t7 (the ADDT classifier)

@pytest.mark.parametrize("name", ["origin_small.t7", "origin_small_legacy.t7"])
def test_t7_fixture(name):
    out = torch.load(fixture("wrn_t7", "outputs.pt"), weights_only=True)
    classifier = load_classifier(fixture("wrn_t7", name))
    assert isinstance(classifier.net, Wide_ResNet) and classifier.net.layer1[0].dropout.p == 0.3
    torch.testing.assert_close(logits(classifier, out["x01"]), out["logits"], rtol=0, atol=1e-5)
    info = classifier.norm_info
    assert (info["family"], info["name"], info["source"]) == ("wide-resnet.pytorch", "cifar10", "default")
    torch.testing.assert_close(torch.tensor(info["mean"]), out["mean"])
    torch.testing.assert_close(torch.tensor(info["std"]), out["std"])
    with pytest.raises(UserError, match="holds a wide-resnet-10-1, not a wrn-10-1; drop --arch"):
        load_classifier(fixture("wrn_t7", name), arch="wrn-10-1")


def test_wide_resnet_names():
    with open(fixture("wrn_t7", "state_dict_shapes.json")) as f:
        want = json.load(f)
    net = Wide_ResNet(10, 1, 0.3, 10)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes(want["state_dict"])
    assert sum(p.numel() for p in net.parameters()) == want["num_parameters"]


def test_t7_cifar100_gets_cifar100_stats(tmp_path):
    net = Wide_ResNet(10, 1, 0.3, 100).eval()
    torch.save({"net": net, "acc": 50.0, "epoch": 1}, tmp_path / "c100.t7")  # pickles models.wide_resnet.Wide_ResNet
    classifier = load_classifier(str(tmp_path / "c100.t7"))
    assert classifier.norm_info["name"] == "cifar100"
    x = torch.rand(2, 3, 32, 32)
    m, s = (torch.tensor(v).view(1, 3, 1, 1) for v in ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]))
    torch.testing.assert_close(logits(classifier, x), logits(net, (x - m) / s))


class RunsCode:
    """A pickle that runs `call(arg)` when unpickled by plain pickle / torch.load(weights_only=False)."""

    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "exec"])
def test_malicious_t7_runs_nothing(tmp_path, how):
    marker = tmp_path / "MARKER"
    evil = (RunsCode(os.system, f"touch {marker}") if how == "os.system"
            else RunsCode(builtins.exec, f"open({str(marker)!r}, 'w').close()"))
    for i, obj in enumerate([{"net": evil, "acc": 1.0, "epoch": 1}, evil, {"state_dict": {"w": evil}}]):
        path = str(tmp_path / f"evil{i}.t7")
        torch.save(obj, path)
        with pytest.raises(UserError, match=rf"evil{i}\.t7.*(system|exec)"):
            load_classifier(path)
        assert not marker.exists(), f"loading {obj!r} ran its code"
    torch.load(path, weights_only=False)  # the file is armed: an unsafe load does run it
    assert marker.exists()


def test_other_pickles_refused(tmp_path):
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "linear.t7")
    with pytest.raises(UserError, match=r"linear\.t7.*torch\.nn\.modules\.linear\.Linear.*state_dict\(\)"):
        load_classifier(str(tmp_path / "linear.t7"))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(UserError, match=r"module\.pt holds a pickled torch\.nn\.modules\.linear\.Linear, not weights"):
        load_classifier(str(tmp_path / "module.pt"))


# ---------------------------------------------------------------- ViT (Hugging Face layout), transformers as oracle

def hf_vit(tmp_path, image_size, preprocessor=None):
    """A small random ViTForImageClassification saved as a Hub folder, and the transformers model."""
    import transformers
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                    image_size=image_size, patch_size=16, num_labels=10)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p += 0.02 * torch.randn(p.shape, generator=g)
    model.save_pretrained(tmp_path)
    if preprocessor:
        with open(tmp_path / "preprocessor_config.json", "w") as f:
            json.dump(preprocessor, f)
    return model


def test_vit_parity_with_resize(tmp_path):
    model = hf_vit(tmp_path, 224)
    classifier = load_classifier(str(tmp_path))
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    # the oracle: transformers' ViT on the bicubic-resized, 0.5/0.5-normalised images
    x224 = F.interpolate(x, (224, 224), mode="bicubic", align_corners=False, antialias=False)
    with torch.no_grad():
        want = model(pixel_values=(x224 - 0.5) / 0.5).logits
    y = logits(classifier, x)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-5)
    assert (want[0] - want[1]).abs().max() > 1e-3  # the inputs matter: a broken net would not pass by chance
    info = classifier.norm_info
    assert info["family"] == "hf-vit" and info["mean"] == [0.5] * 3 and info["std"] == [0.5] * 3
    assert info["resize"] == {"size": [224, 224], "mode": "bicubic", "antialias": False}
    # the weights file itself works too, and the resize is differentiable
    x.requires_grad_(True)
    load_classifier(str(tmp_path / "model.safetensors"))(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_vit_parity_no_resize_and_preprocessor_stats(tmp_path):
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    model = hf_vit(tmp_path, 32, {"do_normalize": True, "image_mean": mean, "image_std": std})
    classifier = load_classifier(str(tmp_path))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(pixel_values=(x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).logits
    torch.testing.assert_close(logits(classifier, x), want, rtol=0, atol=1e-5)
    assert classifier.norm_info["mean"] == pytest.approx(mean) and classifier.norm_info["source"] == "checkpoint"
    with pytest.raises(UserError, match="holds a vit, not a vit-b-16"):
        load_classifier(str(tmp_path), arch="vit-b-16")


def hub_name(key):
    """transformers >= 5 renames ViT's modules in memory (checkpoints keep the old names): undo that."""
    for new, old in [("vit.layers.", "vit.encoder.layer."), ("attention.q_proj", "attention.attention.query"),
                     ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value"),
                     ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                     ("mlp.fc2", "output.dense")]:
        key = key.replace(new, old)
    return key


def test_vit_b_16_names_match_transformers():
    import transformers
    with torch.device("meta"):
        hf = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=10))
        ours = make_net("vit-b-16", 10)
    want = {hub_name(k): tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    assert sum(p.numel() for p in ours.parameters()) == 85_806_346
    assert "vit.encoder.layer.11.attention.attention.query.weight" in want


# ---------------------------------------------------------------- ResNet-18 (ADDT's r18)

def test_resnet18(tmp_path):
    net = make_net("resnet18", 10)
    assert sum(p.numel() for p in net.parameters()) == 11_173_962
    keys = set(net.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight",
            "layer2.0.shortcut.1.running_var", "layer4.1.bn2.weight", "linear.weight", "linear.bias"} <= keys
    assert "layer1.0.shortcut.0.weight" not in keys
    with torch.no_grad():
        assert net.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    classifier = load_classifier(str(tmp_path / "r18.pth"))  # arch told by the keys; raw [0, 1] input as ADDT
    assert classifier.norm_info["name"] == "none" and classifier.norm_info["family"] == "state-dict"
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(logits(classifier, x), logits(net, x))


# ---------------------------------------------------------------- normalisation override and its record

def test_parse_norm():
    assert parse_norm("none") == {"name": "none", "mean": [0.0] * 3, "std": [1.0] * 3}
    assert parse_norm("CIFAR10") == {"name": "cifar10", "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    assert parse_norm(" cifar100 ")["mean"] == [0.5071, 0.4867, 0.4408]
    assert parse_norm("0.5,0.4,0.3/0.2, 0.25,0.3") == {"name": "custom", "mean": [0.5, 0.4, 0.3],
                                                       "std": [0.2, 0.25, 0.3]}
    for bad in ["", "imagenet", "0.5,0.5/0.5,0.5", "0.5,0.5,0.5", "a,b,c/d,e,f", "0.5,0.5,0.5/0.5,0,0.5",
                "1,2,3/1,2,3/1,2,3"]:
        with pytest.raises(UserError, match="--classifier-norm.*none, cifar10, cifar100"):
            parse_norm(bad)


def test_norm_override_changes_logits():
    path = fixture("robustbench_dm", "standard_wrn_16_1.pt")
    x = torch.rand(2, 3, 32, 32)
    plain = load_classifier(path, norm=parse_norm("none"))
    cifar = load_classifier(path, norm="cifar10")
    m, s = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(logits(plain, x), logits(plain.net, x))
    torch.testing.assert_close(logits(cifar, x), logits(plain.net, (x - m) / s))
    assert (logits(cifar, x) - logits(plain, x)).abs().max() > 1e-2
    assert cifar.norm_info == {"name": "cifar10", "mean": pytest.approx(list(CIFAR10_MEAN)),
                               "std": pytest.approx(list(CIFAR10_STD)), "family": "robustbench", "source": "override"}


def test_norm_info_is_json(tmp_path):
    classifier = Classifier(make_net("wrn-10-1", 10), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    ckpt = {"arch": "wrn-10-1", "num_classes": 10, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
            "model": classifier.net.state_dict()}
    torch.save(ckpt, tmp_path / "ours.pt")
    info = json.loads(json.dumps(load_classifier(str(tmp_path / "ours.pt")).norm_info))
    assert info["family"] == "ours" and info["source"] == "checkpoint" and info["name"] == "custom"
    assert info["mean"] == pytest.approx([0.5, 0.4, 0.3])


# ---------------------------------------------------------------- files that are not usable checkpoints

def test_non_finite_weights_refused(tmp_path):
    net = make_net("wrn-10-1", 10)
    sd = net.state_dict()
    sd["block2.layer.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    sd["fc.weight"][0, 0] = float("inf")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(UserError, match=r"nan\.pt has NaN or inf weights, first in block2\.layer\.0\.conv1\.weight"):
        load_classifier(str(tmp_path / "nan.pt"))


def test_text_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("classifier: runs/wrn/ckpt.pt\n")
    with pytest.raises(UserError, match=r"notes\.txt is not a checkpoint: it is a text file"):
        load_classifier(str(tmp_path / "notes.txt"))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match="is not a checkpoint: it is empty"):
        load_classifier(str(tmp_path / "empty.pt"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UserError, match="not a readable Hugging Face ViT folder.*'bert'"):
        load_classifier(str(tmp_path / "hf"))


def test_unknown_state_dict_asks_for_arch(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "odd.pt")
    with pytest.raises(UserError, match=r"cannot tell which architecture.*odd\.pt.*pass --arch, one of") as e:
        load_classifier(str(tmp_path / "odd.pt"))
    assert "None" not in str(e.value)
