"""Errors raised for bad user input, before any expensive work starts."""


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the offending key."""
