"""Make a virtualenv that looks like a GPU host: only the host's packages, borrowed from another env.

    python scripts/host_sim.py VENV [--packages scripts/gpu-host-packages.txt]

Run it with the interpreter whose site-packages lends the packages (e.g. .venv/bin/python). The new
venv has none of its own packages; a .pth file puts a folder of symlinks on its path, one link per
top-level module of each listed distribution that the lending env has (pip is one of them). Used to
check, on a CPU machine, that the wheelhouse installs and runs where only the host's packages exist.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

DEFAULT_PACKAGES = Path(__file__).resolve().parent / "gpu-host-packages.txt"
CARRIED_PACKAGES = Path(__file__).resolve().parent / "gpu-node-packages.txt"


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def host_names(path: Path) -> set[str]:
    """Canonical names listed in a packages file."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {canonical(line) for line in lines if line}


def with_requirements(names: set[str], carried: set[str]) -> set[str]:
    """``names`` plus what they require in the lending env (their versions there may need more than
    the host's do), except the distributions the wheelhouse carries: those must come from it."""
    from packaging.requirements import Requirement

    todo, closure = list(names), set()
    while todo:
        name = todo.pop()
        if name in closure or name in carried:
            continue
        closure.add(name)
        try:
            requires = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return closure


def link_packages(names: set[str], folder: Path) -> list[str]:
    """Symlink each listed distribution's top-level entries into ``folder``; returns the names linked."""
    folder.mkdir(parents=True, exist_ok=True)
    linked = []
    for dist in md.distributions():
        name = canonical(dist.metadata["Name"])
        if name not in names or not dist.files:
            continue
        root = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files if not str(f).startswith("..")}
        for top in tops:
            source, target = root / top, folder / top
            if source.exists() and not target.exists():
                target.symlink_to(source)
        linked.append(name)
    return sorted(linked)


def main() -> None:
    """Command line: create the venv and print the distributions it borrows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("venv", type=Path)
    parser.add_argument("--packages", type=Path, default=DEFAULT_PACKAGES, help="what the host has")
    parser.add_argument("--carried", type=Path, default=CARRIED_PACKAGES, help="what the wheelhouse carries")
    args = parser.parse_args()
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([str(base), "-m", "venv", "--without-pip", "--clear", str(args.venv)], check=True)
    venv_python = args.venv / "bin" / "python"
    purelib = subprocess.run(
        [str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    borrowed = args.venv.resolve() / "host-packages"
    host = host_names(args.packages)
    linked = link_packages(with_requirements(host, host_names(args.carried) - host), borrowed)
    (Path(purelib) / "host-packages.pth").write_text(f"{borrowed}\n")
    extra = sorted(set(linked) - host)
    print(f"{args.venv}: {len(linked)} packages borrowed from {sysconfig.get_paths()['purelib']}"
          f" (beyond the host's list, as their requirements: {', '.join(extra) or 'none'})")


if __name__ == "__main__":
    main()
