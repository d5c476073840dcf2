"""automl: joint architecture + compression search, scored on measured deployed cost."""
__version__ = "0.1.0"
