"""Wan video diffusion models: a self-contained reimplementation."""

__version__ = "0.1.0"
