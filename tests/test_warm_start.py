"""Start-up: the engine without the client's dependencies, and the embedded model's one-time conversion."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_the_core_engine_runs_where_rpyc_is_missing_and_the_client_loads_on_first_use():
    p = _python(
        "import sys; sys.modules['rpyc'] = None\n"  # an import of rpyc now fails, as on a bare GPU image
        "import djinn_nb\n"
        "from djinn_nb.core.engine import Engine\n"
        "from djinn_nb.core.models import build_random\n"
        "e = Engine(build_random('gpt2-tiny'))\n"
        "print('ENGINE', e.generate([1, 2, 3], 2).token_ids)\n"
        "try:\n    djinn_nb.connect\nexcept ImportError as err:\n    print('CLIENT NEEDS', err.name)\n"
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ENGINE [" in p.stdout and "CLIENT NEEDS rpyc" in p.stdout
    p = _python("import djinn_nb, sys; print('rpyc' in sys.modules, djinn_nb.connect.__module__, djinn_nb.Run.__name__)")
    assert p.stdout.split() == ["False", "djinn_nb.client.connection", "Run"], p.stderr[-2000:]


def test_cold_conversion_says_what_and_where_with_a_progress_bar_then_loads_silently(tmp_path, embedded):
    code = ("from djinn_nb.core.models import embedded_dir\n"
            "print('DIR', embedded_dir())\n")
    cold = _python(code, DJINN_CACHE=str(tmp_path))
    assert cold.returncode == 0, cold.stderr[-2000:]
    target = Path(cold.stdout.split("DIR ", 1)[1].strip())
    assert target.parent == tmp_path and (target / "model.safetensors").is_file()
    assert "converting the embedded model once" in cold.stderr and str(target) in cold.stderr
    assert "djinn_nb convert: 100%" in cold.stderr and "4/4" in cold.stderr  # the tqdm bar reached its end
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".convert-")]  # no half-written copy left
    warm = _python(code, DJINN_CACHE=str(tmp_path))
    assert warm.returncode == 0 and "converting" not in warm.stderr and str(target) in warm.stdout
    # the new conversion holds exactly the weights the shared cache gave the session's model
    from safetensors.torch import load_file

    fresh = load_file(target / "model.safetensors")
    own = embedded.model.state_dict()
    assert set(fresh) <= set(own) and all(torch.equal(fresh[k], own[k]) for k in fresh)
