"""Offline operations on images nobody else uses: create, check and repair, resize, compact, commit.

They work through the disk layer where they move virtual-disk contents, and through the image layer's
logged updates where they change structures the disk layer never touches. Front ends reach them through
``vhdxfs.engine`` (loaded on first use).
"""
