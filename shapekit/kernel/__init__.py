"""The kernel: the only place a process starts (`run`), what the kernel holds now (`read`), what it can do
(`probe`), changes with their undo (`change`), and rtnetlink's messages (`netlink`)."""
