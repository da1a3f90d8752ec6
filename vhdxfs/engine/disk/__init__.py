"""The virtual disk: translation of virtual ranges into typed runs, allocation, the I/O guards, flush and
close (``DiskCore``), and the synchronous driver ``Disk``. Built on the image layer
(``vhdxfs.engine.image``); the trio driver (``vhdxfs.engine.aio``) and the offline operations
(``vhdxfs.engine.ops``) build on it.
"""
