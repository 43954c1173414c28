"""mtlrun: a command-line experiment runner for visual multi-task learning."""

from pathlib import Path

__version__ = "0.1.0"

# Hydra's config folder, beside the package: an editable install from a clone keeps it there.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
