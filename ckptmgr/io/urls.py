"""Checking checkpoint URLs and parsing CLI storage options (no I/O)."""

from __future__ import annotations

import json
from typing import Any

from ckptmgr.errors import ConfigError


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """Turn CLI ``key=value`` pairs into storage options (JSON-ish values)."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"Invalid storage option: Received: {pair!r}. Use key=value, "
                "e.g. --storage-option token=anon."
            )
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def check_url(url: Any, what: str = "directory") -> str:
    """Refuse URLs that fsspec would silently read as local paths (``gs:/x``)."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(
            f"Invalid checkpoint {what}: Received: {what}={url!r}. "
            "Pass a local path or an fsspec URL such as gs://bucket/run."
        )
    scheme, sep, rest = url.partition(":")
    if sep and scheme.isalnum() and len(scheme) > 1 and not rest.startswith("//"):
        raise ConfigError(
            f"Invalid URL: Received: {what}={url!r}. A URL needs two slashes after "
            f"the scheme: {scheme}://{rest.lstrip('/')}"
        )
    return url
