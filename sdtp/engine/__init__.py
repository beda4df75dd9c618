"""Pruned-inference engine: schedule, token selection, hooks and generation."""
