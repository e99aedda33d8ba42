"""medalloy: many task-specific medical segmentation datasets and models into one universal model."""

__version__ = "0.1.0"

from medalloy.errors import MedalloyError

__all__ = ["MedalloyError", "__version__"]
