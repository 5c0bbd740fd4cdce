"""VGG-16 with BatchNorm for small images (Simonyan & Zisserman 2015, CIFAR variant): a single
Linear classifier after global average pooling. Stands alone (torch only).
Takes normalised inputs; 32x32 and 64x64 both work."""
import torch.nn as nn
import torch.nn.functional as F

CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.num_classes = num_classes
        layers, c = [], 3
        for v in CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        # 1x1 after five pools at 32x32 already; the pooling is what lets 64x64 through
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))
