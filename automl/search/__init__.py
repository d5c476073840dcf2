"""The Ray Tune controller. Only this package imports Ray."""
