"""The engine for trio: AsyncDisk runs the synchronous core's steps with trio (see engine/steps.py)."""

from .disk import AsyncDisk

__all__ = ["AsyncDisk"]
