"""Shipped scenarios (YAML files); ``recloop run quickstart`` finds them by name."""
