"""Format layer: constants, structure layouts, encode/decode, checksums. No I/O happens here."""
