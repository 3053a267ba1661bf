"""infantry: fetch configuration into a shared directory and keep it fresh."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("infantry")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
