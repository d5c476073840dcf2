"""automl: joint architecture + compression search, scored on measured deployed cost."""
__version__ = "0.1.0"

_API = ("search_compression", "apply", "load")


def __getattr__(name):
    # the API pulls in torch; `import automl` alone stays cheap
    if name in _API:
        from automl import api

        return getattr(api, name)
    raise AttributeError(f"module 'automl' has no attribute {name!r}")


__all__ = list(_API)
