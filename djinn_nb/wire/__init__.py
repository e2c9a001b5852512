"""What both ends of the wire share: the client imports it, the server imports it, core never does.

- ``codec`` (re-exported here: ``wire.dumps``, ``wire.loads``, ``wire.encode_tensor`` …): JSON
  and ``(dtype, shape, bytes)`` tensors, validated on arrival;
- ``protocol``: the constants both ends agree on (the protocol version, the default port);
- ``transport``: rpyc's channel without compression, TCP_NODELAY, bounded frames;
- ``sidechannel``: a ticketed bulk socket for tensors of 1 MiB or more;
- ``tls``: both channels under TLS.

The typed messages themselves (briefs, summaries, requests) are ``djinn_nb.schema``, shared
vocabulary every layer may use. The layers' shape is client → wire ← serving → core.
"""
from .codec import (
    DEFAULT_MAX_PAYLOAD,
    MAX_DIM,
    WIRE_DTYPES,
    check_header,
    decode_tensor,
    dtype_name,
    dumps,
    encode_tensor,
    loads,
)

__all__ = ["DEFAULT_MAX_PAYLOAD", "MAX_DIM", "WIRE_DTYPES", "check_header", "decode_tensor", "dtype_name", "dumps",
           "encode_tensor", "loads"]
