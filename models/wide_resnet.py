"""wide-resnet.pytorch's `Wide_ResNet` (meliketoy/bmsookim), the classifier of the ADDT paper, with
that repository's parameter names, and a reader for its pickled `.t7` checkpoints that runs none of
the pickle's code.

    ckpt = safe_pickle.load("origin.t7")          # {'net': <pickled Wide_ResNet>, 'acc': ..., 'epoch': ...}
    sd, dropout_rate = t7_state_dict(ckpt["net"])
    depth, width, num_classes = wide_resnet_shape(sd)
    net = Wide_ResNet(depth, width, dropout_rate, num_classes).eval()
    net.load_state_dict(sd)

Unlike RobustBench's WideResNet: conv biases, dropout between the two convs, the stride on the
second conv, and a shortcut on the raw (not activated) input. Takes normalised inputs (ADDT and
wide-resnet.pytorch use mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010) on CIFAR-10).
"""
import torch.nn as nn
import torch.nn.functional as F

from models import safe_pickle


class wide_basic(nn.Module):  # noqa: N801 (upstream's class name, as pickles name it)
    def __init__(self, in_planes, planes, dropout_rate, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1)
        self.dropout = nn.Dropout(dropout_rate)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride))

    def forward(self, x):
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        return self.conv2(F.relu(self.bn2(out))) + self.shortcut(x)


class Wide_ResNet(nn.Module):  # noqa: N801
    def __init__(self, depth=28, widen_factor=10, dropout_rate=0.3, num_classes=10):
        super().__init__()
        assert (depth - 4) % 6 == 0 and depth >= 10, f"Wide_ResNet depth must be 6n+4 with n >= 1, got {depth}"
        n = (depth - 4) // 6
        c = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, c[0], 3, padding=1)

        def stage(c_in, c_out, stride):
            return nn.Sequential(*[wide_basic(c_in if i == 0 else c_out, c_out, dropout_rate, stride if i == 0 else 1)
                                   for i in range(n)])
        self.layer1, self.layer2, self.layer3 = stage(c[0], c[1], 1), stage(c[1], c[2], 2), stage(c[2], c[3], 2)
        self.bn1 = nn.BatchNorm2d(c[3], momentum=0.9)  # upstream's momentum; eval mode ignores it
        self.linear = nn.Linear(c[3], num_classes)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.linear(F.avg_pool2d(out, 8).flatten(1))  # upstream pools 8x8: 32x32 inputs only


def wide_resnet_shape(sd):
    """(depth, widen_factor, num_classes) of a Wide_ResNet state dict."""
    n = len({k.split(".")[1] for k in sd if k.startswith("layer1.")})
    return 6 * n + 4, sd["layer1.0.conv1.weight"].shape[0] // 16, sd["linear.weight"].shape[0]


def _dropout_rate(net):
    """Dropout p of the pickled net's first block (only training uses it); 0.3 if it cannot be read."""
    try:
        block = safe_pickle.stub_state(safe_pickle.stub_state(net)["_modules"]["layer1"])["_modules"]["0"]
        return float(safe_pickle.stub_state(safe_pickle.stub_state(block)["_modules"]["dropout"])["p"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return 0.3


def t7_state_dict(net):
    """(state dict, dropout rate) of a pickled Wide_ResNet stub; ValueError if it is something else."""
    name = safe_pickle.stub_name(net) if isinstance(net, safe_pickle.Stub) else type(net).__name__
    if not name.endswith("wide_resnet.Wide_ResNet"):
        raise ValueError(f"its 'net' is a {name}")
    return safe_pickle.module_state_dict(net), _dropout_rate(net)
