"""The error every configuration check raises."""


class ConfigError(ValueError):
    """A configuration mistake, found before any model is loaded."""
