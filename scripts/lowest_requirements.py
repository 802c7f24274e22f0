"""The lowest versions pyproject.toml allows, one `name==floor` a line, for `make test-floors`.

Every requirement of the package and of the extras named (none: the base install alone) must have a `>=` floor;
the floor is what is pinned, so a floor that is not true fails instead of passing unnoticed. A package required
twice (the base and an extra) is pinned at the higher of its floors. torch is left out: the Makefile installs its
CPU build (no CPU build of torch's floor can be had).

    python scripts/lowest_requirements.py [EXTRA ...] > floors.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
LEFT_OUT = {"torch"}
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*(;.*)?$")


def lowest(extras: list[str]) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    own = _normal(project["name"])
    requirements = list(project["dependencies"])
    wanted, seen = list(extras), set()
    while wanted:
        extra = wanted.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in project["optional-dependencies"][extra]:
            name, extras_of, _, _ = REQUIREMENT.match(requirement).groups()
            if _normal(name) == own:  # "precompute-cli[runtime]": the extras it names, not the package
                wanted.extend(e.strip() for e in extras_of.strip("[]").split(","))
            else:
                requirements.append(requirement)
    pins: dict[str, tuple[tuple[int, ...], str]] = {}
    for requirement in requirements:
        name, _, spec, marker = REQUIREMENT.match(requirement).groups()
        if _normal(name) in LEFT_OUT:
            continue
        floor = re.search(r">=\s*([0-9][0-9.]*)(?=[,\s]|$)", spec)
        if floor is None:
            raise SystemExit(f"pyproject.toml: {requirement!r} has no >= floor")
        version = tuple(int(part) for part in floor.group(1).split("."))
        if _normal(name) not in pins or version > pins[_normal(name)][0]:
            pins[_normal(name)] = (version, f"{name}=={floor.group(1)}{marker or ''}")
    return sorted((pin for _, pin in pins.values()), key=str.lower)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


if __name__ == "__main__":
    print("\n".join(lowest(sys.argv[1:])))
