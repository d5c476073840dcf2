"""What several CLI commands share: the space their --space and model flags describe."""
from __future__ import annotations


def load_space_arg(path):
    """The space file a --space flag names, or the embedded default."""
    from automl.spaces import load_default_space, load_space

    return load_default_space() if path is None else load_space(path)


def search_space(args):
    """The space of ``automl search``: --space (or the embedded default) with the flags of a search over
    a user's model applied (automl.spaces.user.space_from_flags)."""
    from automl.spaces.user import USER_FLAGS, space_from_flags

    flags = [k for k in USER_FLAGS if not (k == "epochs" and getattr(args, "supernet", None))]  # with_supernet's
    if not any(getattr(args, k, None) is not None for k in flags):
        return load_space_arg(args.space)
    return space_from_flags(args.space, **{k: getattr(args, k, None) for k in flags})
