"""DefectScope: open edge inspection for factory lines."""

__version__ = "0.1.0"
