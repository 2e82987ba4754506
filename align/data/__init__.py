"""Canonical records, readers/importers, validation and rejects."""
