"""What every vhdxfs daemon shares (the FUSE mount, the NBD server): one lifecycle (lifecycle.py: start,
ready, serve, stop, close, on an AsyncExitStack), daemonizing with a readiness pipe, pid records that tell a
live daemon from a reused pid, stop signals, logging without a terminal, systemd's notify and
socket-activation protocols. Nothing here knows about images: the front ends give the lifecycle callables
that open them."""
