"""The NBD server front end: `vhdxfs serve` exports images over the NBD protocol (docs/nbd.md)."""
