"""Start-up: the engine without the client's dependencies, and the embedded model's one-time conversion."""
from __future__ import annotations

import json

import subprocess
import sys
import time
from pathlib import Path

import pytest
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


# ----- the paused garbage collector (core/gcpause.py) ---------------------------------------------

def test_paused_gc_turns_the_collector_off_and_back_on_once_the_outermost_pause_ends():
    import gc

    from djinn_nb.core.gcpause import paused_gc

    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner pause ending does not end the outer one
    assert gc.isenabled()
    try:
        with paused_gc():
            raise KeyError("inside")
    except KeyError:
        pass
    assert gc.isenabled()  # an exception inside still ends the pause
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # a collector the program had turned off stays off
    finally:
        gc.enable()


def test_what_the_pause_made_goes_to_the_oldest_generation_and_its_cycles_are_still_freed():
    import gc
    import weakref

    from djinn_nb.core.gcpause import paused_gc

    class Node:
        pass

    freed = []
    with paused_gc():
        kept = [Node() for _ in range(2000)]
        cycle = Node()
        cycle.me = cycle
        weakref.finalize(cycle, freed.append, "cycle")
        del cycle
    gen = {g: {id(o) for o in gc.get_objects(generation=g)} for g in (0, 2)}
    assert id(kept[0]) in gen[2] and id(kept[0]) not in gen[0]
    assert gc.get_count()[0] < 100  # no young collection is owed for the 2000 objects
    assert freed == []  # reference counting alone cannot free a cycle...
    gc.collect()
    assert freed == ["cycle"]  # ...and the next full collection does: nothing is exempted


def test_a_long_pause_ends_with_a_full_collection_that_frees_its_cycles_at_once(monkeypatch):
    import gc
    import weakref

    from djinn_nb.core import gcpause

    class Node:
        pass

    monkeypatch.setattr(gcpause, "LONG_PAUSE_S", 0.05)
    freed = []
    with gcpause.paused_gc():
        cycle = Node()
        cycle.me = cycle
        weakref.finalize(cycle, freed.append, "cycle")
        del cycle
        deadline = time.process_time() + 0.2
        while time.process_time() < deadline:  # CPU time, as a conversion or a large load spends it
            pass
        assert freed == []
    assert freed == ["cycle"] and gc.isenabled()


def test_a_program_that_froze_objects_keeps_them_frozen():
    import gc

    from djinn_nb.core.gcpause import paused_gc

    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with paused_gc():
            made = [[] for _ in range(100)]
        # other threads (earlier tests' servers) may free frozen objects meanwhile, so the count may
        # fall a little; unfreezing would make it 0, and nothing made in the pause may be frozen
        # (gc.get_objects() lists every tracked object outside the permanent generation)
        assert gc.isenabled() and 0 < gc.get_freeze_count() <= frozen
        outside = {id(o) for o in gc.get_objects()}
        assert all(id(m) in outside for m in made)
    finally:
        gc.unfreeze()


def test_loading_a_model_runs_no_garbage_collection():
    import gc

    from djinn_nb.core.models import load_model

    runs = []

    def count(phase, info):
        if phase == "start":
            runs.append(info["generation"])

    gc.callbacks.append(count)
    try:
        loaded = load_model("random:llama-tiny")
    finally:
        gc.callbacks.remove(count)
    assert runs == [] and gc.isenabled()
    assert loaded.model.config.num_hidden_layers == 12


def test_connect_in_a_fresh_process_collects_a_handful_of_times_not_a_thousand():
    """The embedded server's imports and load run with the collector paused (before: ~1000
    collections, 0.7 s of the embedded default's 4 s warm start)."""
    code = ("import gc\n"
            "runs = []\n"
            "gc.callbacks.append(lambda phase, info: runs.append(1) if phase == 'start' else None)\n"
            "import djinn_nb\n"
            "client = djinn_nb.connect(model='random:gpt2-tiny', embedded=True)\n"
            "print('COLLECTIONS', len(runs), gc.isenabled(), client.generate([1, 2, 3], max_new_tokens=2).token_ids)\n")
    p = _python(code)
    assert p.returncode == 0, p.stderr[-2000:]
    n, enabled, ids = p.stdout.split("COLLECTIONS ", 1)[1].split(" ", 2)
    assert int(n) < 20 and enabled == "True" and ids.startswith("[")


# ----- the tokenizer of the embedded conversion, built straight from its files ----------------------

TEXTS = ["The capital of France is", "<|im_start|>user\nhi<|im_end|>\n", "  spaces\tand\nnewlines ",
         "émoji 🤖 ünïcode", "", "<|endoftext|><|endoftext|>x"]


def _same_tokenizer(a, b, tmp_path: Path) -> None:
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    for text in TEXTS:
        assert a(text)["input_ids"] == b(text)["input_ids"], text
    ids = list(range(0, a.vocab_size, 97)) + [0, 1, 2]
    assert a.decode(ids) == b.decode(ids) and [a.decode([i]) for i in ids] == [b.decode([i]) for i in ids]
    assert a.special_tokens_map == b.special_tokens_map and a.all_special_ids == b.all_special_ids
    msgs = [{"role": "user", "content": "hi"}]
    assert a.apply_chat_template(msgs, tokenize=False) == b.apply_chat_template(msgs, tokenize=False)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        if f == "tokenizer_config.json":  # what the tokenizer is, not how this copy was loaded
            assert _config(tmp_path / "a" / f) == _config(tmp_path / "b" / f)
        else:
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


# How a tokenizer was loaded, which transformers releases save with it (5.24 adds local_files_only
# where HF_HUB_OFFLINE is set): not part of what it is.
LOADING_KEYS = {"local_files_only", "cache_dir", "force_download", "proxies", "token", "revision",
                "subfolder", "trust_remote_code", "_commit_hash", "name_or_path"}


def _config(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in LOADING_KEYS}


@pytest.mark.parametrize("offline", [False, True], ids=["online", "HF_HUB_OFFLINE"])
def test_the_embedded_tokenizer_is_built_from_its_files_and_equals_autotokenizers(tmp_path, embedded, monkeypatch,
                                                                                 offline):
    from transformers import AutoTokenizer

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)  # read once, at import, from the env

    from djinn_nb.core.models import _saved_tokenizers_backend, embedded_dir, load_tokenizer

    path = str(embedded_dir())
    fast = _saved_tokenizers_backend(path)
    assert type(fast).__name__ == "TokenizersBackend" and type(load_tokenizer(path)) is type(fast)
    _same_tokenizer(AutoTokenizer.from_pretrained(path), fast, tmp_path)
    assert embedded.tokenizer.backend_tokenizer.to_str() == fast.backend_tokenizer.to_str()


def test_added_tokens_saved_by_transformers_take_the_shortcut_and_still_equal_autotokenizers(tmp_path):
    from transformers import AutoTokenizer

    from djinn_nb.core.models import _saved_tokenizers_backend, embedded_dir

    tok = AutoTokenizer.from_pretrained(str(embedded_dir()))
    tok.add_tokens(["<extra_token>"], special_tokens=True)
    tok.add_tokens(["plainnew"])
    tok.save_pretrained(tmp_path / "added")
    fast = _saved_tokenizers_backend(str(tmp_path / "added"))
    assert fast is not None and len(fast) == len(tok) == tok.vocab_size + 2
    assert fast("a <extra_token> b plainnew")["input_ids"] == tok("a <extra_token> b plainnew")["input_ids"]
    _same_tokenizer(AutoTokenizer.from_pretrained(str(tmp_path / "added")), fast, tmp_path)


def test_other_tokenizer_directories_go_through_autotokenizer(tmp_path, saved_models):
    import shutil

    from transformers import AutoTokenizer

    from djinn_nb.core.models import _saved_tokenizers_backend, embedded_dir, load_tokenizer

    assert load_tokenizer(saved_models["gpt2-tiny"]) is None  # a config and no tokenizer files: none
    reference = AutoTokenizer.from_pretrained(str(embedded_dir()))
    # transformers 4 wrote the added-token table into tokenizer_config.json; another class, or a
    # legacy special_tokens_map.json beside the files, also send the directory to AutoTokenizer
    table = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                      "single_word": t.single_word, "special": t.special}
             for i, t in reference.added_tokens_decoder.items()}
    for name, change in (("table", lambda d: _edit_config(d, added_tokens_decoder=table)),
                         ("cls", lambda d: _edit_config(d, tokenizer_class="GPT2Tokenizer")),
                         ("legacy", lambda d: (d / "special_tokens_map.json").write_text("{}"))):
        d = tmp_path / name
        shutil.copytree(embedded_dir(), d, ignore=shutil.ignore_patterns("*.safetensors"))
        change(d)
        assert _saved_tokenizers_backend(str(d)) is None, name
    loaded = load_tokenizer(str(tmp_path / "table"))
    assert loaded.backend_tokenizer.to_str() == reference.backend_tokenizer.to_str()
    assert [loaded(t)["input_ids"] for t in TEXTS] == [reference(t)["input_ids"] for t in TEXTS]


def _edit_config(d: Path, **changes) -> None:
    import json

    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, **changes}))
