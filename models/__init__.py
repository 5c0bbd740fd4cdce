"""Classifiers by name, the [0, 1]-input wrapper that normalises (and, for ViT, resizes) inside the
model so attacks only ever see images in [0, 1], and checkpoint loading that recognises the family
of the file and with it the input normalisation the network was trained with.

    classifier = load_classifier("runs/wrn/ckpt.pt")       # ours: arch and mean/std stored inside
    classifier = load_classifier("origin.t7")              # ADDT's pickled wide-resnet.pytorch WRN-28-10
    classifier = load_classifier("Standard.pt")            # RobustBench: [0, 1] inputs, no normalisation outside
    classifier = load_classifier("hf/vit-cifar10/")        # Hugging Face ViTForImageClassification folder
    classifier = load_classifier("r18.pt", norm=parse_norm("cifar10"))   # --classifier-norm override
    summary["classifier_norm"] = classifier.norm_info      # JSON: what the wrapper applies, and why

Families and their default normalisation (applied by the wrapper, outside the network):
  ours                 the mean/std stored in the checkpoint (train_classifier.py)
  wide-resnet.pytorch  CIFAR-10 (0.4914, 0.4822, 0.4465)/(0.2023, 0.1994, 0.2010), CIFAR-100 stats for 100 classes
  robustbench          none: "Standard" WideResNet takes raw [0, 1] images
  robustbench-dm       none: DMWideResNet normalises inside its own forward
  state-dict           none: a bare ResNet-18/50 or VGG-16 state dict (ADDT feeds its r18 raw [0, 1] images)
  hf-vit               preprocessor_config.json's image_mean/image_std, else 0.5/0.5; bicubic resize to 224
"""
import math
import os
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from addt_common import UserError, unreadable_reason
from models import safe_pickle
from models.dm_wrn import DMWideResNet, dm_arch
from models.resnet import ResNet18, ResNet50
from models.vgg import VGG16
from models.vit import VIT_B_16, ViT, read_hf_vit
from models.wide_resnet import Wide_ResNet, t7_state_dict, wide_resnet_shape
from models.wrn import WideResNet, robustbench_state_dict, state_dict_mismatch

# wide-resnet.pytorch's config.py, as ADDT uses them
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
NORMS = {"none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
         "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}

# The usual names; make_net also takes any other (dm-)wrn-DEPTH-WIDTH and wide-resnet-DEPTH-WIDTH.
ARCHS = {
    "wrn-28-10": lambda n: WideResNet(28, 10, n),
    "wrn-34-10": lambda n: WideResNet(34, 10, n),
    "wrn-70-16": lambda n: WideResNet(70, 16, n),
    "dm-wrn-28-10": lambda n: DMWideResNet(n, 28, 10),
    "dm-wrn-70-16": lambda n: DMWideResNet(n, 70, 16),
    "wide-resnet-28-10": lambda n: Wide_ResNet(28, 10, 0.3, n),
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "vgg16": VGG16,
    "vit-b-16": lambda n: ViT(n, **VIT_B_16),
}
WRN_FAMILIES = {  # RobustBench "Standard" names, RobustBench DMWideResNet, wide-resnet.pytorch Wide_ResNet
    "wrn": lambda d, w, n: WideResNet(d, w, n),
    "dm-wrn": lambda d, w, n: DMWideResNet(n, d, w),
    "wide-resnet": lambda d, w, n: Wide_ResNet(d, w, 0.3, n),
}


def make_net(arch, num_classes):
    if arch in ARCHS:
        return ARCHS[arch](num_classes)
    m = re.fullmatch(r"(dm-wrn|wrn|wide-resnet)-(\d+)-(\d+)", arch)
    if m and int(m[2]) >= 10 and (int(m[2]) - 4) % 6 == 0 and int(m[3]) >= 1:
        return WRN_FAMILIES[m[1]](int(m[2]), int(m[3]), num_classes)
    raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)} or wrn-DEPTH-WIDTH, "
                    "dm-wrn-DEPTH-WIDTH, wide-resnet-DEPTH-WIDTH with (DEPTH - 4) % 6 == 0, e.g. wrn-16-8")


def parse_norm(text):
    """--classifier-norm: 'none', 'cifar10', 'cifar100' or 'M1,M2,M3/S1,S2,S3' -> {name, mean, std}."""
    name = text.strip().lower()
    if name in NORMS:
        return {"name": name, "mean": list(NORMS[name][0]), "std": list(NORMS[name][1])}
    try:
        mean, std = ([float(v) for v in part.split(",")] for part in name.split("/"))
        ok = len(mean) == 3 and len(std) == 3 and all(s > 0 for s in std)
    except ValueError:
        ok = False
    if not ok:
        raise UserError(f"bad --classifier-norm {text!r}: pass none, cifar10, cifar100 or three means and three "
                        "positive stds as M1,M2,M3/S1,S2,S3, e.g. 0.5,0.5,0.5/0.5,0.5,0.5")
    return {"name": "custom", "mean": mean, "std": std}


def norm_name(mean, std):
    """'none', 'cifar10' or 'cifar100' when mean/std are those stats, else 'custom'."""
    def close(a, b):
        return len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b))
    return next((n for n, (m, s) in NORMS.items() if close(mean, m) and close(std, s)), "custom")


class Classifier(nn.Module):
    """Logits of net((resize(x) - mean) / std) for images x in [0, 1]. The resize (to `size`, for ViT)
    is a differentiable bicubic F.interpolate, align_corners=False; antialias=False is torchvision
    Resize on tensors before v0.17 (ADDT's ViT transform), antialias=True the same from v0.17 on and
    closer to PIL's bicubic (cubic coefficient -0.5 instead of -0.75) that ViTImageProcessor uses."""

    def __init__(self, net, mean, std, size=None, antialias=False, info=None, input_size=None):
        super().__init__()
        self.net = net
        self.input_size = None if input_size is None else tuple(input_size)  # (H, W) trained on, when known
        # not persistent: checkpoints hold the bare net's state dict, with the stats as plain lists beside it
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.size = getattr(net, "image_size", None) if size is None else size
        self.antialias = antialias
        mean, std = ([round(v, 6) for v in t.flatten().tolist()] for t in (self.mean, self.std))  # float32 noise off
        self.norm_info = {"name": norm_name(mean, std), "mean": mean, "std": std, "family": "ours",
                          "source": "default", **(info or {})}
        if self.size:
            self.norm_info["resize"] = {"size": [self.size, self.size], "mode": "bicubic", "antialias": antialias}

    def forward(self, x):
        if self.size and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, (self.size, self.size), mode="bicubic", align_corners=False, antialias=self.antialias)
        return self.net((x - self.mean) / self.std)


def build_classifier(arch, num_classes, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    return Classifier(make_net(arch, num_classes), mean, std)


def classifier_checkpoint(classifier, arch, image_size=None):
    """The model part of our checkpoint format; train_classifier.py adds its training keys. image_size:
    (H, W) of the training images, so that data of another size is refused (None: not recorded)."""
    ckpt = {"arch": arch, "num_classes": classifier.net.num_classes,
            "mean": classifier.mean.flatten().tolist(), "std": classifier.std.flatten().tolist(),
            "model": classifier.net.state_dict()}
    if image_size is not None:
        ckpt["image_size"] = [int(v) for v in image_size]
    return ckpt


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_ours(obj, path):
    """The fields of our checkpoint format, checked before anything is built from them."""
    def bad(key, want):
        return UserError(f"classifier checkpoint {path}: {key} is {obj.get(key)!r}, not {want}; the file is "
                         "damaged or not written by train_classifier.py")
    if not isinstance(obj["arch"], str):
        raise bad("arch", "an architecture name")
    if not _positive_int(obj.get("num_classes")):
        raise bad("num_classes", "a positive integer")
    for key in ("mean", "std"):
        v = obj.get(key)
        numbers = isinstance(v, (list, tuple)) and len(v) == 3 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        if not (numbers and (key == "mean" or min(v) > 0)):
            raise bad(key, "three finite numbers" + (" above 0" if key == "std" else ""))
    size = obj.get("image_size")
    if size is not None and not (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(_positive_int, size))):
        raise bad("image_size", "[height, width]")
    if not isinstance(obj["model"], dict):
        raise bad("model", "a state dict")


def guess_arch(sd):
    """Which of our archs a bare state dict seems to be for, or None."""
    if "block1.layer.0.conv1.weight" in sd:
        n = len({k.split(".")[2] for k in sd if k.startswith("block1.layer.")})
        return f"wrn-{6 * n + 4}-{sd['block1.layer.0.conv1.weight'].shape[0] // 16}"
    if "init_conv.weight" in sd and "layer.0.block.0.conv_0.weight" in sd:
        return dm_arch(sd)
    if "layer1.0.conv1.bias" in sd and "linear.weight" in sd:
        depth, width, _ = wide_resnet_shape(sd)
        return f"wide-resnet-{depth}-{width}"
    if "layer4.0.conv3.weight" in sd:
        return "resnet50"
    if "layer4.1.conv2.weight" in sd and "linear.weight" in sd:
        return "resnet18"
    if "features.0.weight" in sd and "classifier.weight" in sd:
        return "vgg16"
    return None


def arch_family(arch):
    if arch.startswith("dm-wrn-"):
        return "robustbench-dm"
    if arch.startswith("wrn-"):
        return "robustbench"
    return "wide-resnet.pytorch" if arch.startswith("wide-resnet-") else "state-dict"


def _num_classes(sd, path):
    # fc.weight for WRN and ResNet-50; otherwise the last Linear weight (the only 2-D weights here)
    weights = [v for k, v in sd.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 2]
    w = sd.get("fc.weight", weights[-1] if weights else None)
    if w is None:
        raise UserError(f"cannot tell the number of classes of {path}: it has no fc.weight nor any Linear weight")
    return w.shape[0]


def _describe(obj):
    if isinstance(obj, safe_pickle.Stub):
        return f"a pickled {safe_pickle.stub_name(obj)}"
    if isinstance(obj, dict):
        return f"a dict with keys {', '.join(map(str, list(obj)[:6]))}{', ...' if len(obj) > 6 else ''}"
    return f"a {type(obj).__name__}"


def _is_text(head):
    """No control bytes but whitespace, and UTF-8 up to a character cut off at the end of `head`.
    Checkpoints never look like this: zip files start 'PK\\x03\\x04', pickles '\\x80'."""
    if any(b < 32 and b not in b"\t\n\r\f" for b in head):
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.reason == "unexpected end of data"
    return True


def _read(path):
    """The object in a checkpoint file. Plain data loads with weights_only=True; anything else (the
    whole-module pickles of wide-resnet.pytorch, say) is read by safe_pickle, which runs none of its code."""
    if not os.path.isfile(path):
        raise UserError(f"classifier checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4096)
    if _is_text(head):
        raise UserError(f"classifier {path} is not a checkpoint: it is {'empty' if not head else 'a text file'}; "
                        "pass a .pt/.pth/.t7 checkpoint or a Hugging Face model folder")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": safe_pickle reads those
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 (any refusal: try the safe unpickler next)
        pass
    try:
        return safe_pickle.load(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"could not read classifier checkpoint {path}: {unreadable_reason(path, e)}") from None


def _check_weights(sd, path):
    """Every entry a tensor, every float finite (a diverged run writes NaN weights that then give
    meaningless accuracies)."""
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise UserError(f"classifier checkpoint {path}: {k} holds {_describe(v)}, not a tensor; "
                            "pass a checkpoint of weights")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"classifier checkpoint {path} has NaN or inf weights, first in {k} "
                            "(a diverged training run?); pass another checkpoint")


def _hf_vit(path):
    try:
        net, sd, mean, std = read_hf_vit(path)
    except (OSError, ValueError) as e:
        raise UserError(f"classifier {path} is not a readable Hugging Face ViT folder: {e}") from None
    arch = "vit-b-16" if all(net.config.get(k) == v for k, v in VIT_B_16.items()) else "vit"
    return arch, net, sd, (mean, std, "checkpoint"), {"family": "hf-vit"}


def _parts(path, arch):
    """(arch, net, state dict, default (mean, std, source), norm_info extras) of the file's family."""
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path) or (path.endswith((".safetensors", ".bin"))
                               and os.path.isfile(os.path.join(folder, "config.json"))):
        return _hf_vit(path)
    obj = _read(path)
    if isinstance(obj, dict) and "arch" in obj and "model" in obj:  # ours
        check_ours(obj, path)
        net = make_net(obj["arch"], obj["num_classes"])
        return (obj["arch"], net, obj["model"], (obj["mean"], obj["std"], "checkpoint"),
                {"family": "ours", "input_size": obj.get("image_size")})
    if isinstance(obj, dict) and isinstance(obj.get("net"), safe_pickle.Stub):  # wide-resnet.pytorch's main.py
        try:
            sd, dropout_rate = t7_state_dict(obj["net"])
            depth, width, num_classes = wide_resnet_shape(sd)
        except (ValueError, KeyError) as e:
            raise UserError(f"classifier checkpoint {path} is a pickle but not of a wide-resnet.pytorch Wide_ResNet "
                            f"({e}); only that whole-model pickle is read (without running it): for another model "
                            "pass its state_dict() saved with torch.save") from None
        norm = NORMS["cifar100" if num_classes == 100 else "cifar10"]
        return (f"wide-resnet-{depth}-{width}", Wide_ResNet(depth, width, dropout_rate, num_classes), sd,
                (*norm, "default"), {"family": "wide-resnet.pytorch"})
    try:
        sd = robustbench_state_dict(obj)
    except ValueError:
        raise UserError(f"classifier checkpoint {path} holds {_describe(obj)}, not weights; pass a state dict, "
                        "our checkpoint, a wide-resnet.pytorch .t7 or a Hugging Face ViT folder") from None
    _check_weights(sd, path)  # before reading shapes off it
    found = guess_arch(sd)
    if arch is None and found is None:
        raise UserError(f"cannot tell which architecture classifier checkpoint {path} is for (its keys start "
                        f"{', '.join(list(sd)[:3])}); pass --arch, one of {', '.join(ARCHS)} or wrn-DEPTH-WIDTH")
    net = make_net(arch or found, _num_classes(sd, path))
    family = arch_family(arch or found)
    norm = NORMS[{"wide-resnet.pytorch": "cifar100" if net.num_classes == 100 else "cifar10"}.get(family, "none")]
    info = {"family": family}
    if isinstance(net, DMWideResNet):
        info["net_normalises"] = {"mean": net.mean.flatten().tolist(), "std": net.std.flatten().tolist()}
    return arch or found, net, sd, (*norm, "default"), info  # a bare state dict takes the arch it is given


def load_classifier(path, arch=None, num_classes=None, norm=None):
    """A Classifier in eval mode on the CPU taking [0, 1] images, from any checkpoint family (see the
    module docstring). arch and num_classes, when given, must agree with the file; norm (parse_norm's
    result, or its text) replaces the family's default normalisation."""
    path = os.fspath(path)
    found, net, sd, (mean, std, source), info = _parts(path, arch)
    if arch is not None and arch != found:
        raise UserError(f"classifier checkpoint {path} holds a {found}, not a {arch}; "
                        "drop --arch or pass the right checkpoint")
    if num_classes is not None and num_classes != net.num_classes:
        raise UserError(f"classifier checkpoint {path} has {net.num_classes} classes, the data have {num_classes}: "
                        "pass the classifier trained on this data set")
    _check_weights(sd, path)
    problems = state_dict_mismatch(net, sd)
    if problems:
        seems = guess_arch(sd)
        hint = (f"it seems to be for a {seems}" + (f"; pass --arch {seems}" if seems != arch else "")
                if seems else "it does not look like a state dict of any arch here")
        raise UserError(f"classifier checkpoint {path} does not fit a {found} with {net.num_classes} "
                        f"classes ({problems}); {hint}")
    net.load_state_dict(sd, strict=True)
    if norm is not None:
        norm = parse_norm(norm) if isinstance(norm, str) else norm
        mean, std, source = norm["mean"], norm["std"], "override"
    input_size = info.pop("input_size", None)
    return Classifier(net, mean, std, info={**info, "source": source}, input_size=input_size).eval()
