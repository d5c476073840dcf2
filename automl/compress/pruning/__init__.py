"""Pruning methods, criteria and schedules."""
