"""mtlrun: a command-line experiment runner for visual multi-task learning."""

__version__ = "0.1.0"
