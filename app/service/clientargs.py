"""How clients (HTTP and the command line) name things the service takes in other terms."""

from __future__ import annotations

#: A client's name for "every collection"; the service and gallery say None.
ALL_COLLECTIONS = "*"


def collection_arg(value: str | None, default: str | None = "default") -> str | None:
    """Client collection -> gallery argument: "*" means every collection (None), empty the default."""
    if value is None or value == "":
        return default
    return None if value == ALL_COLLECTIONS else value
