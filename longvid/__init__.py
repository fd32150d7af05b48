"""longvid: long and high-resolution video generation with existing video diffusion models."""

__version__ = "0.1.0"
