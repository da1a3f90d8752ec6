"""Live operations: manage a running disk (an ``AsyncDisk`` a daemon serves) without stopping its users.

- ``checkpoint(disk, name=None)``: freeze the top, write into a new differencing child (checkpoint.py);
- ``merge(disk, layer)``: merge a layer into its parent, the active top included (merge.py);
- ``resize(disk, size)``: grow (or shrink) a disk without checkpoints (resize.py);
- ``disk_status(disk)``, ``chain_info(disk)``: what it is and does (status.py);
- ``chain_top(path)``: what a writable mount of an image opens once checkpoints froze it
  (engine/image/chainrecord.py).

One live operation runs at a time per disk (state.py); each pauses the disk only for the moment it
changes the chain. docs/running.md tells the user's side and what a crash at each step leaves.
"""

from .checkpoint import chain_top, checkpoint
from .merge import MergeResult, merge
from .resize import resize
from .state import Operation, running
from .status import chain_info, disk_status

__all__ = ["MergeResult", "Operation", "chain_info", "chain_top", "checkpoint", "disk_status", "merge", "resize",
           "running"]
