"""Granularities: structure counts, group views and expanded masks for Conv and Linear weights."""
import pytest
import torch

from automl.compress.pruning.granularity import GRANULARITIES, expand_mask, group_view, structure_count
from automl.errors import ConfigError, UnknownNameError

CONV = (4, 3, 3, 3)
LINEAR = (6, 8)


@pytest.mark.parametrize("shape, gran, block, count, group", [
    (CONV, "element", (1, 4), 108, 1),
    (CONV, "kernel", (1, 4), 12, 9),
    (CONV, "filter", (1, 4), 4, 27),
    (CONV, "channel", (1, 4), 3, 36),
    (CONV, "block", (2, 3), 18, 6),
    (CONV, "block", (1, 27), 4, 27),
    (LINEAR, "element", (1, 4), 48, 1),
    (LINEAR, "filter", (1, 4), 6, 8),
    (LINEAR, "row", (1, 4), 6, 8),
    (LINEAR, "channel", (1, 4), 8, 6),
    (LINEAR, "column", (1, 4), 8, 6),
    (LINEAR, "block", (1, 4), 12, 4),
    (LINEAR, "block", (2, 4), 6, 8),
    ((4, 3, 5), "kernel", (1, 4), 12, 5),
])
def test_counts_views_and_mask_shapes(shape, gran, block, count, group):
    w = torch.randn(shape)
    assert structure_count(shape, gran, block) == count
    assert group_view(w, gran, block).shape == (count, group)
    mask = expand_mask(torch.ones(count, dtype=torch.bool), shape, gran, block)
    assert mask.shape == shape and mask.dtype == torch.bool and bool(mask.all())


@pytest.mark.parametrize("shape, gran, block", [
    (CONV, "element", None), (CONV, "kernel", None), (CONV, "filter", None), (CONV, "channel", None),
    (CONV, "block", (2, 3)), (LINEAR, "row", None), (LINEAR, "column", None), (LINEAR, "block", (2, 4)),
])
def test_expand_mask_zeroes_exactly_the_dropped_groups(shape, gran, block):
    block = block or (1, 4)
    w = torch.arange(1.0, 1.0 + torch.Size(shape).numel()).view(shape)   # no zeros anywhere
    n = structure_count(shape, gran, block)
    keep = torch.arange(n) % 3 != 1
    rows = group_view(w * expand_mask(keep, shape, gran, block), gran, block)
    assert bool((rows[~keep] == 0).all())
    assert torch.equal(rows[keep], group_view(w, gran, block)[keep])


def test_filter_and_channel_slices_on_conv():
    mask = expand_mask(torch.tensor([True, False, True, True]), CONV, "filter")
    assert not mask[1].any() and mask[[0, 2, 3]].all() and int(mask.sum()) == 81
    mask = expand_mask(torch.tensor([True, False, True]), CONV, "channel")
    assert not mask[:, 1].any() and mask[:, [0, 2]].all() and int(mask.sum()) == 72


def test_kernel_slice_on_conv():
    keep = torch.ones(12, dtype=torch.bool)
    keep[4] = False                                   # structure 4 = (out 1, in 1)
    mask = expand_mask(keep, CONV, "kernel")
    assert not mask[1, 1].any() and int(mask.sum()) == 108 - 9


def test_block_tiles_on_linear():
    w = torch.arange(48.0).view(LINEAR)
    rows = group_view(w, "block", (2, 4))
    assert rows[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert rows[1].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    assert rows[2].tolist() == [16, 17, 18, 19, 24, 25, 26, 27]
    keep = torch.ones(6, dtype=torch.bool)
    keep[1] = False
    mask = expand_mask(keep, LINEAR, "block", (2, 4))
    assert not mask[0:2, 4:8].any() and int(mask.sum()) == 40


def test_channel_view_is_input_columns():
    w = torch.arange(48.0).view(LINEAR)
    assert group_view(w, "column")[0].tolist() == [0, 8, 16, 24, 32, 40]
    assert torch.equal(group_view(w, "channel"), group_view(w, "column"))


def test_expanded_mask_is_not_aliased():
    mask = expand_mask(torch.ones(4, dtype=torch.bool), CONV, "filter")
    mask[0, 0, 0, 0] = False
    assert int(mask.sum()) == 107


@pytest.mark.parametrize("shape, gran, layer", [
    (LINEAR, "kernel", "Linear"), (CONV, "row", "Conv2d"), (CONV, "column", "Conv2d"),
    ((5,), "filter", "1-D tensor"),
])
def test_granularity_not_for_layer_type(shape, gran, layer):
    with pytest.raises(ConfigError, match=f"does not apply to a {layer} weight") as err:
        structure_count(shape, gran)
    assert "valid granularities" in str(err.value)
    with pytest.raises(ConfigError):
        group_view(torch.zeros(shape), gran)


def test_unknown_granularity_and_bad_blocks():
    with pytest.raises(UnknownNameError, match="did you mean 'filter'"):
        group_view(torch.zeros(LINEAR), "filters")
    with pytest.raises(ConfigError, match="does not tile"):
        structure_count(CONV, "block", (1, 4))        # 27 columns
    with pytest.raises(ConfigError, match="two positive integers"):
        structure_count(LINEAR, "block", (0, 4))
    with pytest.raises(ConfigError, match="one flag per structure"):
        expand_mask(torch.ones(5, dtype=torch.bool), CONV, "filter")
    assert GRANULARITIES.names() == sorted(["element", "kernel", "filter", "channel", "row", "column", "block"])
