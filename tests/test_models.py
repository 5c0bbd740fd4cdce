import pytest
import torch

from addt_common import UserError
from models import Classifier, build_classifier, classifier_checkpoint, load_classifier, make_net, parse_norm
from models.wrn import WideResNet


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def randomised(net, seed=0):
    """Every parameter and BN statistic drawn at random, so a zero or unit init cannot hide a
    parameter that failed to load; eval mode so the running statistics are used."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                # fan-in scaling keeps activations O(1), so a closeness check stays meaningful
                r = torch.randn(t.shape, generator=g) * (0.5 if t.ndim < 2 else (t[0].numel()) ** -0.5)
                t.copy_(r.abs() + 0.5 if name.endswith("running_var") else r)
    return net.eval()


@pytest.mark.parametrize("arch,size", [("wrn-28-10", 32), ("wrn-16-2", 64), ("resnet50", 32), ("resnet50", 64),
                                       ("vgg16", 32), ("vgg16", 64), ("resnet18", 32), ("resnet18", 64),
                                       ("dm-wrn-16-1", 32), ("wide-resnet-10-2", 32)])
def test_forward_shape(arch, size):
    net = make_net(arch, 7).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_param_counts():
    assert abs(n_params(make_net("wrn-28-10", 10)) - 36.5e6) < 0.1e6
    with torch.device("meta"):  # counting only: no memory, no init
        assert abs(n_params(make_net("wrn-70-16", 10)) - 267e6) < 1e6
    assert abs(n_params(make_net("resnet50", 10)) - 23.5e6) < 0.1e6
    assert abs(n_params(make_net("vgg16", 10)) - 14.7e6) < 0.1e6
    assert abs(n_params(make_net("wide-resnet-28-10", 10)) - 36.5e6) < 0.1e6


def test_wrn_names_match_robustbench():
    keys = set(WideResNet(10, 1).state_dict())
    assert "block1.layer.0.bn1.weight" in keys and "block2.layer.0.convShortcut.weight" in keys
    assert "block1.layer.0.convShortcut.weight" not in keys  # 16 -> 16 channels: identity shortcut
    assert {"conv1.weight", "bn1.running_mean", "fc.weight", "fc.bias"} <= keys
    assert "block3.layer.0.convShortcut.weight" in set(WideResNet(10, 2).state_dict())


def test_unknown_arch():
    for bad in ["resnet19", "wrn-27-10", "wrn-4-1", "dm-wrn-27-10"]:
        with pytest.raises(UserError, match="wrn-DEPTH-WIDTH"):
            make_net(bad, 10)


def test_wrapper_normalises():
    net = randomised(make_net("wrn-10-1", 10))
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    x = torch.rand(3, 3, 32, 32)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(Classifier(net, mean, std)(x), net((x - m) / s))
    assert list(Classifier(net, mean, std).state_dict()) == [f"net.{k}" for k in net.state_dict()]  # stats not stored


def expected(net, x, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
    """RobustBench-layout and other bare state dicts take raw [0, 1] images: no normalisation by default."""
    with torch.no_grad():
        return Classifier(net, mean, std).eval()(x)


def layouts(sd):
    sub_block1 = {k.replace("block1.", "sub_block1.", 1): v.clone() for k, v in sd.items() if k.startswith("block1.")}
    module = {f"module.{k}": v for k, v in sd.items()}
    everything = {"state_dict": {f"module.{k}": v for k, v in {**sd, **sub_block1}.items()}}
    return {"plain": sd, "state_dict": {"state_dict": sd}, "model": {"model": sd}, "module": module,
            "sub_block1": {**sd, **sub_block1}, "all": everything}


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "module", "sub_block1", "all"])
def test_robustbench_layouts(tmp_path, layout):
    net = randomised(make_net("wrn-10-1", 10))
    path = tmp_path / "rb.pt"
    torch.save(layouts(net.state_dict())[layout], path)
    loaded = load_classifier(str(path), arch="wrn-10-1")
    assert not loaded.training and loaded.mean.device.type == "cpu"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected(net, x))


def test_robustbench_other_arch_and_num_classes(tmp_path):
    net = randomised(make_net("wrn-10-1", 100))
    torch.save(net.state_dict(), tmp_path / "c100.pt")
    loaded = load_classifier(str(tmp_path / "c100.pt"), arch="wrn-10-1", norm=parse_norm("0.5,0.5,0.5/0.25,0.25,0.25"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = loaded(x)
    assert out.shape == (2, 100)
    torch.testing.assert_close(out, expected(net, x, (0.5,) * 3, (0.25,) * 3))
    vgg = randomised(make_net("vgg16", 20))  # last Linear is classifier.weight, not fc.weight
    torch.save({f"module.{k}": v for k, v in vgg.state_dict().items()}, tmp_path / "vgg.pt")
    with torch.no_grad():
        torch.testing.assert_close(load_classifier(str(tmp_path / "vgg.pt"), arch="vgg16")(x), expected(vgg, x))


def test_robustbench_mismatches(tmp_path):
    sd = randomised(make_net("wrn-10-1", 10)).state_dict()
    path = str(tmp_path / "bad.pt")
    renamed = {k.replace("block2.layer.0.conv1.", "block2.layer.0.convA."): v for k, v in sd.items()}
    torch.save(renamed, path)
    with pytest.raises(UserError, match=r"missing keys 1: block2\.layer\.0\.conv1\.weight.*"
                                        r"unexpected keys 1: block2\.layer\.0\.convA\.weight"):
        load_classifier(path, arch="wrn-10-1")
    torch.save({k: v for k, v in sd.items() if not k.startswith("bn1.")}, path)
    with pytest.raises(UserError, match=r"missing keys 5: bn1\.weight"):
        load_classifier(path, arch="wrn-10-1")
    torch.save(sd, path)
    with pytest.raises(UserError, match=r"shape mismatches.*seems to be for a wrn-10-1; pass --arch wrn-10-1"):
        load_classifier(path, arch="wrn-10-2")
    assert isinstance(load_classifier(path).net, WideResNet)  # no --arch: told by the keys


def test_our_format_round_trip(tmp_path):
    classifier = build_classifier("wrn-10-1", 10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    randomised(classifier.net)
    ckpt = {**classifier_checkpoint(classifier, "wrn-10-1"), "optimizer": {}, "step": 3}
    path = str(tmp_path / "ours.pt")
    torch.save(ckpt, path)
    assert torch.load(path, weights_only=True)["arch"] == "wrn-10-1"
    loaded = load_classifier(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), classifier(x))
    torch.testing.assert_close(loaded.mean.flatten(), torch.tensor([0.5, 0.4, 0.3]))
    assert isinstance(load_classifier(path, arch="wrn-10-1").net, WideResNet)
    with pytest.raises(UserError, match="holds a wrn-10-1, not a resnet50; drop --arch"):
        load_classifier(path, arch="resnet50")


def test_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_classifier(str(tmp_path / "nope.pt"))
    torch.save({"net": make_net("wrn-10-1", 10)}, tmp_path / "pickled.pt")  # wide-resnet.pytorch style, other class
    with pytest.raises(UserError, match=r"not of a wide-resnet\.pytorch Wide_ResNet \(its 'net' is a "
                                        r"models\.wrn\.WideResNet\).*state_dict\(\)"):
        load_classifier(str(tmp_path / "pickled.pt"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(UserError, match="holds a Tensor, not weights"):
        load_classifier(str(tmp_path / "tensor.pt"))
