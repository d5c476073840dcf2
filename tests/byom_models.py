"""Small user models for the bring-your-own-model tests (loaded by file path, as a user's would be)."""
import torch
import torch.nn as nn


class Tiny(nn.Module):
    """conv-BN-ReLU x2 with a residual add, a concat and a Linear head, for 1x8x8 digits."""

    def __init__(self, width=16, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.side = nn.Conv2d(width, width, 1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = torch.cat([x, torch.relu(self.side(x))], 1)
        return self.head(x.mean((2, 3)))


def build(width: int = 16, num_classes: int = 10) -> nn.Module:
    return Tiny(width, num_classes)


def not_a_model():
    return "model"
