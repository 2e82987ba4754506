"""Integration tests against the real programs (a package, so its conftest does not shadow tests/conftest.py)."""
