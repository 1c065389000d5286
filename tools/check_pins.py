"""Check that the installed packages are exactly the versions a constraints file pins.

    python tools/check_pins.py constraints.txt        # exit 0: all pinned versions installed; 1: a mismatch

`make test` runs it before the suite (unless `CONSTRAINTS=` is empty, i.e. testing against the newest
releases), so a run that passed is known to have used the pinned versions. Lines are `name==version`;
comments, blank lines and `-c`/`-r` includes are ignored; names compare as PEP 503 normalised names.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str | Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if m is None:
            raise ValueError(f"{path}:{n}: expected 'name==version', got {raw!r}")
        pins[normalise(m.group(1))] = m.group(2)
    return pins


def mismatches(pins: dict[str, str], installed: dict[str, str] | None = None) -> list[str]:
    """One line per pinned package whose installed version differs (or that is not installed)."""
    out = []
    for name, want in sorted(pins.items()):
        if installed is None:
            # The distribution an import would load: the first on sys.path. (Iterating all distributions would also
            # see copies vendored inside other packages, e.g. setuptools/_vendor/packaging, once those directories
            # are on sys.path.)
            try:
                have = metadata.version(name)
            except metadata.PackageNotFoundError:
                have = None
        else:
            have = installed.get(name)
        if have != want:
            out.append(f"{name}: pinned {want}, installed {have or 'nothing'}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/check_pins.py CONSTRAINTS_FILE", file=sys.stderr)
        return 2
    try:
        bad = mismatches(read_pins(argv[0]))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if bad:
        print(f"error: the installed packages differ from {argv[0]}:", file=sys.stderr)
        for line in bad:
            print(f"  {line}", file=sys.stderr)
        print("Fix: `make clean test` to reinstall from the pins, or `make pins` after a passing run to update them.",
              file=sys.stderr)
        return 1
    print(f"pins: {len(read_pins(argv[0]))} packages installed exactly as {argv[0]} pins them")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
