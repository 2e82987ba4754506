"""Plug-in code named in recipes: `package.module:Name` -> the object.

The one importer for judge classes (`kind: module:Class`), rules functions, `reward.function` and eval judges.
Whatever it imports is code: run only recipes you trust.
"""

from __future__ import annotations

import importlib
from typing import Any

from align.errors import ConfigError


def import_object(spec: str, what: str) -> Any:
    """'package.module:Name' -> the object. Errors say what was missing and how to write the spec."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {spec!r} must look like package.module:Name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what} {spec!r}: cannot import {module_name} ({e}); is the package installed and on "
                          f"PYTHONPATH?") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} {spec!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
