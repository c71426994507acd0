"""hive-relay: a content-blind relay for end-to-end-encrypted event envelopes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hive-relay")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0.0.0"

__all__ = ["__version__"]
