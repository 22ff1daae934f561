"""Errors a user can fix: the CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input: names what is wrong (a field, a file, an option) and why."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason

    def __reduce__(self):  # copies and pickles (Ray Tune copies a trial's exception) keep both parts
        return type(self), (self.where, self.reason)


class ConfigError(UserError):
    """A configuration field or file is invalid."""
