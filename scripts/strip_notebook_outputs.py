"""Outputs never reach the tracked notebooks: strip them, from the command line or on save.

The notebooks under ``notebooks/`` are generated from their jupytext sources
(``make notebooks``) and tested to hold no outputs. JupyterLab autosaves a notebook
with its outputs, and ``jupytext --update`` keeps the outputs it finds, so:

- ``python scripts/strip_notebook_outputs.py FILE.ipynb ...`` strips files in place
  (``make notebooks`` runs it after jupytext);
- :func:`pre_save_hook` strips the tracked notebooks as JupyterLab saves them
  (``make lab`` loads it through ``scripts/lab_config.py``). The outputs stay in the
  open tab; to keep a copy with them, "Save Notebook As…" outside ``notebooks/``
  or under another name.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

#: The tracked notebooks, by path relative to the repository (or the server's root).
TRACKED = re.compile(r"(^|/)notebooks/0\d_[A-Za-z0-9_]+\.ipynb$")


def strip(nb: Any) -> bool:
    """Clear every code cell's outputs and execution count (a dict or nbformat node); True if any changed."""
    changed = False
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs") or cell.get("execution_count") is not None:
            changed = True
        cell["outputs"] = []
        cell["execution_count"] = None
    if "widgets" in nb.get("metadata", {}):
        del nb["metadata"]["widgets"]
        changed = True
    return changed


def pre_save_hook(model: dict[str, Any], path: str = "", **_: Any) -> None:
    """JupyterLab's ``ContentsManager.pre_save_hook``: strip a tracked notebook before it is written."""
    if model.get("type") == "notebook" and TRACKED.search(path.replace("\\", "/")):
        strip(model["content"])


def main(paths: list[str]) -> int:
    for name in paths:
        path = Path(name)
        nb = json.loads(path.read_text(encoding="utf-8"))
        if strip(nb):
            path.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"stripped outputs from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
