"""Classifiers by name, the [0, 1]-input wrapper that normalises inside the model (so attacks
only ever see images in [0, 1]), and checkpoint loading for our own format and RobustBench's.

    classifier = load_classifier("runs/wrn/ckpt.pt")           # ours: arch and stats inside
    classifier = load_classifier("Standard.pt")                 # RobustBench: wrn-28-10, CIFAR-10 stats
    classifier = load_classifier("r50.pt", arch="resnet50")     # a plain state dict of another arch
"""
import re

import torch
import torch.nn as nn

from addt_common import UserError, load_checkpoint
from models.resnet import ResNet50
from models.vgg import VGG16
from models.wrn import WideResNet, load_robustbench_state_dict, robustbench_state_dict

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def _wrn(depth, width):
    return lambda num_classes: WideResNet(depth, width, num_classes)


# The usual names; make_net also takes any other wrn-DEPTH-WIDTH.
ARCHS = {
    "wrn-28-10": _wrn(28, 10),
    "wrn-34-10": _wrn(34, 10),
    "wrn-70-16": _wrn(70, 16),
    "resnet50": ResNet50,
    "vgg16": VGG16,
}


def make_net(arch, num_classes):
    if arch in ARCHS:
        return ARCHS[arch](num_classes)
    m = re.fullmatch(r"wrn-(\d+)-(\d+)", arch)
    if m and int(m[1]) >= 10 and (int(m[1]) - 4) % 6 == 0 and int(m[2]) >= 1:
        return _wrn(int(m[1]), int(m[2]))(num_classes)
    raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)} "
                    "or wrn-DEPTH-WIDTH with (DEPTH - 4) % 6 == 0, e.g. wrn-16-8")


class Classifier(nn.Module):
    """Logits of net((x - mean) / std) for images x in [0, 1]."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        # not persistent: checkpoints hold the bare net's state dict, with the stats as plain lists beside it
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def build_classifier(arch, num_classes, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    return Classifier(make_net(arch, num_classes), mean, std)


def classifier_checkpoint(classifier, arch):
    """The model part of our checkpoint format; train_classifier.py adds its training keys."""
    return {"arch": arch, "num_classes": classifier.net.num_classes,
            "mean": classifier.mean.flatten().tolist(), "std": classifier.std.flatten().tolist(),
            "model": classifier.net.state_dict()}


def guess_arch(sd):
    """Which of our archs a bare state dict seems to be for, or None."""
    if "block1.layer.0.conv1.weight" in sd:
        n = len({k.split(".")[2] for k in sd if k.startswith("block1.layer.")})
        return f"wrn-{6 * n + 4}-{sd['block1.layer.0.conv1.weight'].shape[0] // 16}"
    if "layer4.0.conv3.weight" in sd:
        return "resnet50"
    if "features.0.weight" in sd and "classifier.weight" in sd:
        return "vgg16"
    return None


def _num_classes(sd, path):
    # fc.weight for WRN and ResNet; otherwise the last Linear weight (the only 2-D weights here)
    weights = [v for k, v in sd.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 2]
    w = sd.get("fc.weight", weights[-1] if weights else None)
    if w is None:
        raise UserError(f"cannot tell the number of classes of {path}: it has no fc.weight nor any Linear weight")
    return w.shape[0]


def _read(path):
    try:
        return load_checkpoint(path, "classifier checkpoint")
    except UserError as e:
        # weights_only refuses pickled objects: the whole-model files of wide-resnet.pytorch, say
        if "Weights only load failed" in str(e):
            raise UserError(f"classifier checkpoint {path} holds pickled Python objects (a whole model?), "
                            "which are not loaded since unpickling can run code; load it once where you trust "
                            "it and re-save the weights: torch.save(model.state_dict(), path) (a state dict "
                            "with RobustBench WRN, ResNet-50 or VGG-16 names)") from None
        raise


def load_classifier(path, arch=None, num_classes=None, mean=None, std=None):
    """A Classifier in eval mode on the CPU from our checkpoint format or a RobustBench-style state
    dict (arch defaults to wrn-28-10, num_classes to fc.weight's rows, mean/std to CIFAR-10's)."""
    obj = _read(path)
    if isinstance(obj, dict) and "arch" in obj and "model" in obj:  # ours
        if arch is not None and arch != obj["arch"]:
            raise UserError(f"checkpoint {path} holds a {obj['arch']}, not a {arch}; "
                            "drop --arch or pass the right checkpoint")
        if num_classes is not None and num_classes != obj["num_classes"]:
            raise UserError(f"checkpoint {path} has {obj['num_classes']} classes, the data have {num_classes}: "
                            "pass the classifier trained on this data set")
        arch, num_classes, sd = obj["arch"], obj["num_classes"], obj["model"]
        mean = obj["mean"] if mean is None else mean
        std = obj["std"] if std is None else std
    else:
        try:
            sd = robustbench_state_dict(obj)
        except ValueError as e:
            raise UserError(f"classifier checkpoint {path}: {e}") from None
        arch = "wrn-28-10" if arch is None else arch
        num_classes = _num_classes(sd, path) if num_classes is None else num_classes
    classifier = build_classifier(arch, num_classes, CIFAR10_MEAN if mean is None else mean,
                                  CIFAR10_STD if std is None else std)
    try:
        # its unwrapping and key checks suit every arch; only RobustBench WRNs carry sub_block1.*
        load_robustbench_state_dict(classifier.net, sd)
    except ValueError as e:
        seems = guess_arch(sd)
        hint = (f"it seems to be for a {seems}" + (f"; pass --arch {seems}" if seems != arch else "")
                if seems else "it does not look like a wrn-DEPTH-WIDTH, resnet50 or vgg16 state dict")
        raise UserError(f"classifier checkpoint {path} does not fit a {arch} with {num_classes} classes "
                        f"({e}); {hint}") from None
    return classifier.eval()
