"""One module per command: its typer app (thin) and its orchestration of config → plan → kernel.
`common` holds what every command shares: the options, the one-line errors, the lock."""
