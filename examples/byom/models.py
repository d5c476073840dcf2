"""A user's own model, written without automl in mind: residual blocks with squeeze-excitation, a
depthwise-separable block, a concatenation and a Linear head, for 3x32x32 inputs."""
import torch
import torch.nn as nn


class SE(nn.Module):
    def __init__(self, channels, reduction=4):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.se = SE(channels)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.se(self.bn2(self.conv2(y))))


class SmallNet(nn.Module):
    def __init__(self, num_classes=10, width=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.block1 = Block(width)
        self.down = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width, bias=False),
                                  nn.BatchNorm2d(width), nn.Conv2d(width, 2 * width, 1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.block2 = Block(2 * width)
        self.side = nn.Sequential(nn.Conv2d(2 * width, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(3 * width, num_classes)

    def forward(self, x):
        x = self.block2(self.down(self.block1(self.stem(x))))
        x = torch.cat([x, self.side(x)], dim=1)
        return self.head(torch.flatten(self.pool(x), 1))


def build(num_classes: int = 10, width: int = 32) -> nn.Module:
    return SmallNet(num_classes=num_classes, width=width)
