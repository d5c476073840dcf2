"""Elastic weight-sharing networks: train once, extract sub-networks with inherited weights, recalibrate."""
