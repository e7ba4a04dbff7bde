"""Fast ResNet-34 trunk (doc/design.md): log-mel frames -> 128-d frame sequence at 1/4 the frame rate."""
import torch
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels, reduction=8):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, max(channels // reduction, 1)), nn.ReLU(inplace=True),
            nn.Linear(max(channels // reduction, 1), channels), nn.Sigmoid())

    def forward(self, x):
        w = self.fc(x.mean(dim=(2, 3)))
        return x * w[:, :, None, None]


class SEBasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = SqueezeExcite(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        res = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + res)


class FastResNet34(nn.Module):
    """Input [B, T, n_mels] log-mel; output [B, T', C] with T' = ceil(T/4), C = channels[-1].

    Mean/variance normalisation is an instance norm over time per mel bin, inside the
    network (the paper uses no CMVN in the features).
    """

    def __init__(self, n_mels=40, channels=(16, 32, 64, 128), layers=(3, 4, 6, 3)):
        super().__init__()
        self.instance_norm = nn.InstanceNorm1d(n_mels)
        self.conv1 = nn.Conv2d(1, channels[0], 7, stride=(2, 1), padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU(inplace=True)
        strides = [1, 2, 2, 1]  # (freq, time) strides of the four stages
        blocks, cin = [], channels[0]
        for cout, n, stride in zip(channels, layers, strides):
            for i in range(n):
                blocks.append(SEBasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = channels[-1]

    def forward(self, feats):
        x = self.instance_norm(feats.transpose(1, 2))          # [B, F, T]
        x = self.relu(self.bn1(self.conv1(x.unsqueeze(1))))     # [B, C, F/2, T]
        x = self.blocks(x)                                       # [B, 128, F/8, T/4]
        return x.mean(dim=2).transpose(1, 2)                     # [B, T/4, 128]
