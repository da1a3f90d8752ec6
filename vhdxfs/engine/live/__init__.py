"""Live operations: manage a running disk (an ``AsyncDisk`` a daemon serves) without stopping its users.

- ``checkpoint(disk, name=None)``: freeze the top, write into a new differencing child (checkpoint.py);
- ``merge(disk, layer)``: merge a layer into its parent, the active top included (merge.py);
- ``resize(disk, size)``: grow (or shrink) a disk without checkpoints (resize.py);
- ``disk_status(disk)``, ``chain_info(disk)``: what it is and does (status.py);
- ``chain_top(path)``: what a writable mount of an image opens once checkpoints froze it
  (engine/image/chainrecord.py);
- ``command_table(served, daemon)``: the control channel's commands over a daemon's disks, which the mount
  and the NBD server share and extend (commands.py).

One live operation runs at a time per disk (state.py); each pauses the disk only for the moment it
changes the chain. docs/running.md tells the user's side and what a crash at each step leaves.
"""

from .checkpoint import chain_top, checkpoint
from .commands import Served, command_table, held, opened_paths, pick
from .merge import MergeResult, merge
from .resize import resize
from .state import Operation, running
from .status import chain_info, disk_status

__all__ = ["MergeResult", "Operation", "Served", "chain_info", "chain_top", "checkpoint", "command_table",
           "disk_status", "held", "merge", "opened_paths", "pick", "resize", "running"]
