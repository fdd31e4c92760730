"""Pure plans: config (+ saved state, + what the kernel holds now) → ordered commands (argv tuples, batch
lines, restore text). No I/O. The seeds' scripts live here again: the tree (`tree`), the mangle chains
(`mangle`), per-IP caps (`limits`), download shaping (`ingress`); and readers of what the kernel prints
(`tc_text`, `drift`, `status`)."""
