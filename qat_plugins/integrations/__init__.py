"""Integrations with third-party compression toolkits (optional dependencies, imported lazily)."""
