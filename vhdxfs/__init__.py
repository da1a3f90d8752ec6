"""vhdxfs: VHDX virtual disks presented as raw files through FUSE."""

__version__ = "0.1.0"
