"""Plugins for third-party compression toolkits; importing this package registers them (NNCF is imported
only when an NNCF function runs)."""

from . import nncf

__all__ = ["nncf"]
