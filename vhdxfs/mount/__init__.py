"""Mount layer: the FUSE daemon (lifecycle) and its Operations (one raw file per image)."""
