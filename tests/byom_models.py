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


# -- the contract set: one small graph per construct a real model has (inputs 1x8x8, 10 classes) -----------
def _cbr(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = _cbr(1, 16), _cbr(16, 16), _cbr(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b(self.a(x)))
        return self.head(x.mean((2, 3)))


class Dense(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.l1, self.l2 = _cbr(1, 16), _cbr(16, 8), _cbr(24, 8)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(1, 16)
        self.expand, self.dw = _cbr(16, 32, 1), _cbr(32, 32, 3, groups=32)
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.head(x.mean((2, 3)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.g, self.pw = _cbr(1, 16), _cbr(16, 32, 3, groups=4), _cbr(32, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.pw(self.g(self.stem(x))).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv = _cbr(1, 16), _cbr(16, 32)
        self.fc1, self.fc2 = nn.Linear(32, 8), nn.Linear(8, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.conv(self.stem(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return self.head((x * s[:, :, None, None]).mean((2, 3)))


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.g1, self.g2 = _cbr(1, 16), _cbr(16, 32, 1, groups=2), _cbr(32, 32, 1, groups=2)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.g1(self.stem(x))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(self.g2(x).mean((2, 3)))


class Attention(nn.Module):
    """CBAM: channel attention from average- and max-pooled maps through one MLP, expanded over the map,
    then a spatial gate from the max and mean over channels (onnxruntime's symbolic shape inference
    cannot follow its exported graph)."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = _cbr(1, 16), _cbr(16, 32)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 32))
        self.avg, self.max, self.spatial = nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1), nn.Conv2d(2, 1, 7, 1, 3)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.conv(self.stem(x))
        att = torch.sigmoid(self.mlp(self.avg(x)) + self.mlp(self.max(x)))
        x = x * att.unsqueeze(2).unsqueeze(3).expand_as(x)
        pooled = torch.cat((x.max(dim=1)[0].unsqueeze(1), x.mean(dim=1).unsqueeze(1)), dim=1)
        return self.head((x * torch.sigmoid(self.spatial(pooled))).mean((2, 3)))


class LinearOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


GRAPHS = {"residual": Residual, "dense": Dense, "inverted_residual": InvertedResidual, "grouped": Grouped,
          "se": SqueezeExcite, "shuffle": Shuffle, "attention": Attention, "linear": LinearOnly}


def graph(kind: str) -> nn.Module:
    return GRAPHS[kind]()
