"""Shared code of the exp3 white-box breakpoint experiment (config, timing, metrics, model setup).

Importing it puts the repository root on ``sys.path`` when ``djinn_nb`` is not
installed (the GPU machine runs from a copy of the working tree).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXP_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = EXP_DIR.parents[1]

if importlib.util.find_spec("djinn_nb") is None and str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
