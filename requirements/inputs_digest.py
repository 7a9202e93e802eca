"""The sha256 of the pyproject.toml inputs a lock file was generated from, recorded in the lock.

    python3 requirements/inputs_digest.py write LOCK...   # `make lock` runs this after uv
    python3 requirements/inputs_digest.py check LOCK...   # `make env` runs this first; exit 1 if stale

The digest covers [project] requires-python, dependencies and optional-dependencies (every extra),
as canonical JSON (sorted keys and lists, no spaces), so comments and formatting do not count.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
PREFIX = "# pyproject-inputs-sha256: "
LINE = re.compile(rf"^{re.escape(PREFIX)}([0-9a-f]{{64}})$", re.MULTILINE)


def inputs_digest(pyproject: Path = PYPROJECT) -> str:
    project = tomllib.loads(pyproject.read_text())["project"]
    inputs = {
        "requires-python": project.get("requires-python", ""),
        "dependencies": sorted(project.get("dependencies", [])),
        "optional-dependencies": {k: sorted(v) for k, v in project.get("optional-dependencies", {}).items()},
    }
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def recorded_digest(lock_text: str) -> str | None:
    match = LINE.search(lock_text)
    return match.group(1) if match else None


def write(lock: Path, digest: str) -> None:
    """Put the digest line right after the header's leading comment lines (uv's command), replacing an old one."""
    lines = [line for line in lock.read_text().splitlines() if not line.startswith(PREFIX)]
    header = 0
    while header < len(lines) and lines[header].startswith("#"):
        header += 1
    lines.insert(header, PREFIX + digest)
    lock.write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("write", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    digest = inputs_digest()
    status = 0
    for name in argv[1:]:
        lock = Path(name)
        if argv[0] == "write":
            write(lock, digest)
        elif recorded_digest(lock.read_text()) != digest:
            print(
                f"error: {lock} was generated from other pyproject.toml dependencies; run: make lock", file=sys.stderr
            )
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
