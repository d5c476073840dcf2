"""Registry look-ups with hints, and layer selection by exact name or `re:` pattern."""
import pytest
import torch.nn as nn

from automl.compress import METHODS, get_method
from automl.compress.layers import select_layers
from automl.errors import ConfigError, UnknownNameError
from automl.registry import Registry, closest, did_you_mean
from automl.tasks import get_task


@pytest.fixture
def registry():
    reg = Registry("widget")
    for name in ("alpha", "beta", "gamma"):
        reg.register(name)(object())
    return reg


def test_get_returns_registered(registry):
    obj = object()
    registry.register("delta")(obj)
    assert registry.get("delta") is obj
    assert "delta" in registry and "epsilon" not in registry
    assert registry.names() == ["alpha", "beta", "delta", "gamma"]
    assert [n for n, _ in registry.items()] == registry.names()


def test_get_unknown_lists_names_and_closest(registry):
    with pytest.raises(UnknownNameError) as info:
        registry.get("gama", file="x.yaml", key="thing.kind")
    err = info.value
    assert isinstance(err, ConfigError) and err.exit_code == 2
    assert str(err) == ("x.yaml: thing.kind: unknown widget (got 'gama'). "
                        "Fix: did you mean 'gamma'? valid names: alpha, beta, gamma")


def test_get_unknown_without_close_match(registry):
    with pytest.raises(UnknownNameError) as info:
        registry.get("zzzzzz")
    assert "did you mean" not in str(info.value)
    assert "valid names: alpha, beta, gamma" in str(info.value)


@pytest.mark.parametrize("name", [None, 3, ["alpha"], {"choice": ["alpha"]}])
def test_get_non_string_names(registry, name):
    with pytest.raises(UnknownNameError) as info:
        registry.get(name)
    assert f"(got {name!r})" in str(info.value)


def test_duplicate_register_raises(registry):
    with pytest.raises(ValueError, match="widget 'alpha' is registered twice"):
        registry.register("alpha")(object())


def test_closest_and_did_you_mean():
    assert closest("MAGNITUD", ["magnitude", "int8_ptq"]) == "magnitude"
    assert closest("xyz", ["magnitude"]) is None
    assert did_you_mean("widht", ["width", "depth"]) == "did you mean 'width'? "
    assert did_you_mean("qqq", ["width"]) == ""


def test_builtin_methods_registered():
    assert {"int8_ptq", "magnitude"} <= set(METHODS.names())
    assert get_method("magnitude").category == "pruning"
    with pytest.raises(UnknownNameError, match="unknown quantization method") as info:
        get_method("magnitude", category="quantization")
    assert "valid names: binary, data_free, fp16, int8_pt2e, int8_ptq, kmeans, mixed, none, qat, ternary" in str(info.value)


# --- layer selection -------------------------------------------------------------------------

class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


class Wrapped(nn.Module):
    """Like DataParallel: the real model sits under `module`."""

    def __init__(self, model):
        super().__init__()
        self.module = model


@pytest.fixture
def model():
    return Small()


def test_exact_names(model):
    chosen = select_layers(model, ["head", "features.0"])
    assert list(chosen) == ["features.0", "head"]  # model order, not pattern order
    assert chosen["head"] is model.head and chosen["features.0"] is model.features[0]


def test_regex_patterns(model):
    assert list(select_layers(model, ["re:.*"])) == ["features.0", "features.3", "head"]
    assert list(select_layers(model, [r"re:features\.\d+"])) == ["features.0", "features.3"]
    # Full match: 'features' alone does not select 'features.0'.
    with pytest.raises(UnknownNameError):
        select_layers(model, ["re:features"])


def test_only_prunable_kinds(model):
    with pytest.raises(UnknownNameError):
        select_layers(model, ["features.1"])  # BatchNorm is not a prunable layer
    assert list(select_layers(model, ["re:.*"], kinds=(nn.BatchNorm2d,))) == ["features.1"]


def test_overlapping_patterns_select_once(model):
    assert list(select_layers(model, ["head", "re:h.*", "re:.*"])) == ["features.0", "features.3", "head"]


def test_module_prefix_is_ignored(model):
    wrapped = Wrapped(model)
    assert list(select_layers(wrapped, ["head"])) == ["head"]
    assert list(select_layers(wrapped, ["module.head"])) == ["head"]
    assert list(select_layers(model, ["module.features.3"])) == ["features.3"]
    assert list(select_layers(wrapped, [r"re:features\..*"])) == ["features.0", "features.3"]
    assert list(select_layers(wrapped, [r"re:module\.features\..*"])) == ["features.0", "features.3"]
    assert select_layers(wrapped, ["head"])["head"] is model.head


def test_no_match_lists_nearest_names(model):
    with pytest.raises(UnknownNameError) as info:
        select_layers(model, ["head", "featurs.0"])
    msg = str(info.value)
    assert msg.startswith("layers: layer pattern matches no prunable layer (got 'featurs.0')")
    assert "nearest layer names: features.0" in msg
    assert "re:<regex>" in msg


def test_regex_no_match_lists_nearest(model):
    with pytest.raises(UnknownNameError) as info:
        select_layers(model, [r"re:conv\d"])
    assert "(got 're:conv\\\\d')" in str(info.value)
    assert "nearest layer names:" in str(info.value)


def test_invalid_regex(model):
    with pytest.raises(UnknownNameError, match="invalid regular expression") as info:
        select_layers(model, ["re:features.(0"])
    assert "fix the regex after 're:'" in str(info.value)


def test_select_layers_on_the_digits_cnn():
    net = get_task("digits").build_model("cnn", {"width": 8, "depth": 3, "pooling": "max"})
    names = list(select_layers(net, ["re:.*"]))
    assert names == ["features.0", "features.4", "features.7", "head"]
    assert list(select_layers(net, [r"re:features\..*"])) == names[:3]
    with pytest.raises(UnknownNameError) as info:
        select_layers(net, ["features.1"])
    assert "features.0" in str(info.value)
