"""What every vhdxfs daemon shares (the FUSE mount, the NBD server): one lifecycle (lifecycle.py: start,
ready, serve, stop, close, on an AsyncExitStack), daemonizing with a readiness pipe, pid records that tell a
live daemon from a reused pid and list what it holds, stop signals, logging without a terminal, systemd's
notify and socket-activation protocols, and the control channel through which commands reach a running
daemon (control_protocol.py: the messages, without I/O; control.py: the daemon's side; control_client.py:
the CLI's). Nothing here knows about images: the front ends give the lifecycle callables that open them,
and the control channel commands that act on them (engine/live/commands.py)."""
