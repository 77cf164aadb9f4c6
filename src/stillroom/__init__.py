"""stillroom: distil a strong teacher into a small student, prove it with gates, ship it."""

__version__ = "0.2.0"
