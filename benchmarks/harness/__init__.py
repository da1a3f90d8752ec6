"""The benchmark harness: one set of jobs, one visiting loop and one report for both front ends.

  procs.py        running commands and daemons, and stopping every one of them whatever happens
  baseline.py     vhdxfs run from another checkout's code (--baseline DIR, --vhdxfs-src DIR)
  jobs.py         the fio jobs of both front ends, their selection (--jobs, --profile), fio's command line
  visits.py       the image, the A B B A visiting loop, the clean-up of a run (session)
  results.py      medians, ratio tables, the vhdxfs/vhdxfs-base comparison, results/<stamp>.{json,md}
  options.py      the options both front ends take, and their checks
  fuse.py         benchmarks/run: the FUSE driver (fio psync on each contender's raw file) and its report
  fuse_mounts.py  the FUSE contenders: vhdxfs, qemu-storage-daemon, vhdimount, the passthrough
  footprint.py    peak RSS with a 64 TiB image open, and the time to open it
  nbd.py          benchmarks/run-nbd: the NBD driver (fio's nbd engine)
  nbd_servers.py  the NBD contenders: vhdxfs serve, qemu-nbd, nbdkit's python plugin
  nbd_report.py   the NBD report: spreads, daemon CPU per request, other load, commands, profiles
  cpu.py          CPU accounting from /proc (per request, and the machine's other load)
  profiler.py     --profile: py-spy and strace -c on the vhdxfs daemon, per request
  side_by_side.py benchmarks/run-side-by-side: vhdxfs and qsd mounted at once, plain fio A B B A
"""
