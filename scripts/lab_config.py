"""``make lab``'s JupyterLab configuration: the tracked notebooks are saved without outputs.

See scripts/strip_notebook_outputs.py for why.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strip_notebook_outputs import pre_save_hook  # noqa: E402

c = get_config()  # noqa: F821 - provided by Jupyter when it loads this file
c.FileContentsManager.pre_save_hook = pre_save_hook
