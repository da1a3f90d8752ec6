"""The image: one VHDX file as structures (headers, log, region table, metadata, BAT, sector bitmaps), the
host file that holds them, and the parent locator that links a differencing image to its parent.

Nothing here knows the virtual disk's requests; the disk layer (``vhdxfs.engine.disk``) builds on it. The
one name exported, ``VhdxFile`` (the one loader, strict or lenient), is also the documented seam for tests
and the offline operations that look at structures directly.
"""

from .loader import VhdxFile

__all__ = ["VhdxFile"]
