"""Fixtures live in plugin modules, one per real part they start."""

pytest_plugins = ["tests.fixtures_nats", "tests.fixtures_ollama"]
