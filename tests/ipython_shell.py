"""The process's IPython shell with ``%load_ext djinn_nb``, for the magic tests, and ``magic(shell, line)``.

IPython keeps one ``InteractiveShell`` per process, so the magic test modules share it; each
module's fixture opens it and, at the module's end, closes the widgets and the client the
magics made, so the next module starts unconnected.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from IPython.core.interactiveshell import InteractiveShell


@contextmanager
def djinn_shell() -> Iterator[InteractiveShell]:
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "djinn_nb")
    try:
        yield sh
    finally:
        magics = sh.magics_manager.registry["DjinnMagics"]
        for w in magics.widgets:
            w.close()
        if magics.client is not None:
            magics.client.close()
            magics.client = None


def magic(shell: InteractiveShell, line: str) -> Any:
    """``%name rest`` run in ``shell``: ``magic(sh, "djinn_break layer=6")``."""
    name, _, rest = line.partition(" ")
    return shell.run_line_magic(name, rest)
