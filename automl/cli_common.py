"""What several CLI commands share: the space their --space and model flags describe."""
from __future__ import annotations

import contextlib

from automl.errors import ConfigError


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


# the space keys the flags of a search over a user's model fill in
FLAG_KEYS = {"model.builder": "model", "model.checkpoint": "checkpoint", "data.path": "data", "task": "task"}


@contextlib.contextmanager
def flags_named(args):
    """A ConfigError about a value the user gave as a flag names the flag, not the space file the value
    was written into (the embedded space is not a file the user can edit)."""
    try:
        yield
    except ConfigError as exc:
        key = str(exc.key or "")
        flag = FLAG_KEYS.get(key) or ("data" if key.startswith("data.") else None)
        if flag is None or getattr(args, flag, None) is None:
            raise
        named = f"--{flag}" if key in FLAG_KEYS else f"--{flag} ({key})"  # e.g. data.val_fraction of --data
        raise type(exc)(exc.message, key=named, value=exc.value, fix=exc.fix) from None
