"""Errors that mean "the user's input or config is wrong": the CLI prints them as one line and exits 2."""

from __future__ import annotations


class InputError(Exception):
    """Bad input: names the file, line and field, and says how to fix it.

    ``str(err)`` is the single line the CLI prints, e.g.
    ``data/train.jsonl:17: field 'rewards': has 3 values but 'completions' has 4. Fix: give one reward per completion.``
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = str(self.file)
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        what = f"field '{self.field}': " if self.field else ""
        fix = f" Fix: {self.fix}" if self.fix else ""
        msg = self.message.rstrip(".")
        return f"{where}{what}{msg}.{fix}".replace("\n", " ")


class ConfigError(InputError):
    """A config file or a ``key=value`` override is invalid."""
