"""Checkpoint key-layout conversion: declarative key tables between our (official) names and others."""

from .keymap import KeyTable

__all__ = ["KeyTable"]
