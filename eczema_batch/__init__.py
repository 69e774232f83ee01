"""eczema-batch: catalogue eczema photographs and measure severity over time."""

__version__ = "0.1.0"
