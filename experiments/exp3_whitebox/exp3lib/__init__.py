"""Shared code of the exp3 white-box breakpoint experiment (config, timing, metrics, model setup).

Imported as ``experiments.exp3_whitebox.exp3lib``: the scripts run as modules from the
repository root, so ``djinn_nb`` is the installed package or the one in that root.
"""
from __future__ import annotations

from pathlib import Path

EXP_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = EXP_DIR.parents[1]
