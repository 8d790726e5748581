"""noisyseg: semantic segmentation from noisy and coarse annotations."""

__version__ = "0.1.0"
