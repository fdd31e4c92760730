"""The two ways a shapekit command fails, each with its exit status."""

from __future__ import annotations


class ShapekitError(Exception):
    """A failure reported as one line; `exit_code` is the process exit status."""

    exit_code = 1


class UsageError(ShapekitError):
    """Bad input (options, config, values, environment): nothing was changed."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file problem: names the file, the key and the reason."""

    def __init__(self, path: object, key: str, reason: str) -> None:
        super().__init__(f"{path}: {key}: {reason}" if key else f"{path}: {reason}")


class CommandFailed(ShapekitError):
    """A system command failed; the message names it and carries its stderr."""

    exit_code = 1

    def __init__(self, command: str, stderr: str, outcome: str = "") -> None:
        detail = " ".join(stderr.split()) or "no error output"
        message = f"`{command}` failed: {detail}"
        super().__init__(f"{message}; {outcome}" if outcome else message)
        self.command = command
        self.stderr = stderr
        self.outcome = outcome

    def then(self, outcome: str) -> CommandFailed:
        """The same failure, with what was done about it after."""
        return CommandFailed(self.command, self.stderr, "; ".join(o for o in (self.outcome, outcome) if o))


class Interrupted(ShapekitError):
    """A signal (Ctrl-C, SIGTERM from systemd or `timeout`) stopped a run between two of its steps."""

    def __init__(self, signum: int, outcome: str) -> None:
        import signal

        super().__init__(f"interrupted by {signal.Signals(signum).name}; {outcome}")
        self.exit_code = 128 + signum
        self.outcome = outcome

    @property
    def put_back(self) -> bool:
        """Whether what the run changed is as before (or nothing was): see Journal.roll_back."""
        return not self.outcome.startswith("putting back")
