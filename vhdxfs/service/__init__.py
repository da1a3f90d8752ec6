"""What every vhdxfs daemon shares (the FUSE mount, the NBD server): daemonizing with a readiness pipe,
pid records that tell a live daemon from a reused pid, logging without a terminal, systemd's notify and
socket-activation protocols. Nothing here knows about images."""
