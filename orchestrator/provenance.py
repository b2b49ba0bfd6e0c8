"""What a submission ran with: package versions, git revision, hardware."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("orch", "ray", "mlflow", "torch", "transformers", "pyarrow", "pydantic", "vllm")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages results depend on."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def git_revision(cwd: Path | None = None) -> str | None:
    """HEAD of the git checkout holding the code (with '-dirty' when modified), or None."""
    where = cwd or Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware() -> dict[str, Any]:
    """The driver host, and the Ray cluster's total resources when connected."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    try:
        import ray

        if ray.is_initialized():
            info["cluster_resources"] = {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
            info["nodes"] = sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception:  # provenance is best effort; never fail a submission for it
        pass
    return info
