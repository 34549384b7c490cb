"""thumbalign: turn thumbs-up / thumbs-down feedback into a better language model."""

__version__ = "0.1.0"
