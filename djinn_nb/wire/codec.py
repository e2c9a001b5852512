"""Tensors and structured values as plain bytes and JSON, validated on the way in.

rpyc copies only primitives (str, bytes, numbers, tuples of those) by value;
anything else becomes a remote reference whose every use is a network round
trip and, on a server, an attack surface. So every call crosses as JSON text
plus raw tensor bytes described by ``(dtype, shape)``: never pickle.
"""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from ..errors import BadRequestError

if TYPE_CHECKING:
    import torch


class _WireDtypes(Mapping[str, "torch.dtype"]):
    """The dtypes that may cross, by name. Their names need no torch: a client that connects,
    generates and decodes text never imports it (``connect()`` to a running server in well under
    a second); the first tensor does."""

    _NAMES = ("float32", "float16", "bfloat16", "float64", "int64", "int32")

    def __getitem__(self, name: str) -> "torch.dtype":
        if name not in self._NAMES:
            raise KeyError(name)
        import torch

        return getattr(torch, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)

    def __contains__(self, name: object) -> bool:
        return name in self._NAMES


WIRE_DTYPES: Mapping[str, "torch.dtype"] = _WireDtypes()
DEFAULT_MAX_PAYLOAD = 1 << 30  # 1 GiB
MAX_DIM = 1 << 40  # any larger dimension is a malformed header, whatever the other dims are


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def encode_tensor(t: torch.Tensor) -> tuple[dict[str, Any], bytes]:
    """``({"dtype", "shape"}, raw bytes)`` of a tensor, in C order."""
    name = dtype_name(t.dtype)
    if name not in WIRE_DTYPES:
        raise BadRequestError(f"dtype {name} cannot cross the wire; use one of {sorted(WIRE_DTYPES)}")
    import torch

    t = t.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"dtype": name, "shape": list(t.shape)}, data


def check_header(meta: Any, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> tuple[torch.dtype, list[int], int]:
    """Validate a tensor header; returns ``(dtype, shape, nbytes)`` or raises ``BadRequestError``."""
    if not isinstance(meta, dict) or set(meta) != {"dtype", "shape"}:
        raise BadRequestError("a tensor header must be {'dtype': str, 'shape': [int, ...]}")
    name, shape = meta["dtype"], meta["shape"]
    if type(name) is not str or name not in WIRE_DTYPES:
        raise BadRequestError(f"unknown dtype {name!r}; known: {sorted(WIRE_DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or any(type(d) is not int or not 0 <= d <= MAX_DIM for d in shape)
    ):
        raise BadRequestError(f"shape must be a list of at most 8 ints in 0..2**40, got {shape!r}")
    dtype = WIRE_DTYPES[name]
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise BadRequestError(f"tensor of {nbytes} bytes is over the server's cap of {max_bytes} bytes")
    return dtype, list(shape), nbytes


def decode_tensor(meta: Any, data: Any, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> torch.Tensor:
    """Rebuild a tensor from ``encode_tensor``'s output; any mismatch is a ``BadRequestError``."""
    dtype, shape, expected = check_header(meta, max_bytes)
    if type(data) is not bytes:
        raise BadRequestError(f"tensor payload must be bytes, got {type(data).__name__}")
    if len(data) != expected:
        raise BadRequestError(
            f"payload has {len(data)} bytes, but {meta['dtype']} {tuple(shape)} needs {expected}"
        )
    import torch

    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    # one copy: the tensor must own writable memory, and ``bytes`` is immutable
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# Made once: json.dumps/loads with any option build a new encoder/decoder per call (~2 us each).
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def dumps(value: Any) -> str:
    """Compact JSON; NaN and infinities (an fp16 logit overflow, say) become ``null``."""
    try:
        return _ENCODER.encode(value)
    except ValueError:
        return _ENCODER.encode(_finite(value))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def loads(text: Any, what: str = "arguments") -> Any:
    """Parse JSON text from the other side; non-text or bad JSON is a ``BadRequestError``."""
    if type(text) is not str:
        raise BadRequestError(f"{what} must be JSON text, got {type(text).__name__}")
    if len(text) > 1 << 24:
        raise BadRequestError(f"{what} are over 16 MiB of JSON")
    try:
        value, end = _DECODER.raw_decode(text)  # decode() would also skip whitespace around it, by regex
    except (ValueError, RecursionError) as e:
        raise BadRequestError(f"{what} are not valid JSON: {e}") from None
    if end != len(text):
        raise BadRequestError(f"{what} are not valid JSON: extra data at character {end}")
    return value
