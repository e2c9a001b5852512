"""Where a result was measured (versions, device names, time), JSON output and the run log."""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from . import REPO_ROOT


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - absent or broken: report as not available
        return None
    return getattr(mod, "__version__", "unknown")


def _git_commit() -> str | None:
    """The commit that ran: ``$DJINN_COMMIT`` where the tree is a copy whose git HEAD is not it
    (the device machine's), else ``git rev-parse``; a tree with uncommitted changes says so."""
    if os.environ.get("DJINN_COMMIT"):
        return os.environ["DJINN_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return (commit + ("+uncommitted changes" if dirty else "")) or None


def device_name(device: str | torch.device) -> str:
    """``torch.cuda.get_device_name`` for a CUDA device, else the CPU's description."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def model_dtype(dtype: str | torch.dtype | None, device: str | torch.device, model: str | None = None) -> str:
    """The dtype a model loaded with ``dtype`` on ``device`` has (``None``/``auto``: float32 on a CPU,
    bfloat16 on a GPU; the embedded default: float32 unless a dtype is given), as ``load_model``."""
    from djinn_nb.core.models import EMBEDDED, resolve_dtype

    if dtype is None and model in (None, EMBEDDED):
        dtype = "float32"
    return str(resolve_dtype(dtype, str(device))).replace("torch.", "")


def environment(device: str | torch.device, dtype: str | torch.dtype | None) -> dict[str, Any]:
    """Versions and hardware of this run, and the dtype of what was measured (``None``: no
    model tensors, e.g. a wire benchmark); every result file embeds it (``write_json`` checks)."""
    cuda = torch.cuda.is_available()
    return {
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "rpyc": _version("rpyc"),
        "djinn_nb": _version("djinn_nb"),
        "git_commit": _git_commit(),
        "device": str(device),
        "device_name": device_name(device),
        "cuda_runtime": torch.version.cuda if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None, tuples lists, unknown objects strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


RECORDED = ("device_name", "git_commit", "dtype")


def write_json(path: str | Path, obj: Any) -> Path:
    """Write a result: it must carry ``environment()`` (device name, commit and dtype) at its top."""
    env = obj.get("environment") if isinstance(obj, dict) else None
    missing = [k for k in RECORDED if not isinstance(env, dict) or k not in env]
    if missing:
        raise ValueError(f"{path}: a result records environment(device, dtype); missing {missing}")
    return _write_json(path, obj)


def _write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(obj), indent=2) + "\n", encoding="utf-8")
    return path


def setup_logging(log_file: str | Path, name: str = "exp3", console: bool = True) -> logging.Logger:
    """A logger writing to ``log_file`` (everything) and stderr (info and up; with
    ``console=False`` only warnings and errors, as a notebook wants)."""
    log = logging.getLogger(name)
    log.setLevel(logging.DEBUG)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(log_file, mode="w", encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.INFO if console else logging.WARNING)
    sh.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(fh)
    log.addHandler(sh)
    log.propagate = False
    return log
