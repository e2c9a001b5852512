"""What both ends of the wire share: the client imports it, the server imports it, core never does.

- ``messages``: the runs' typed messages (briefs, summaries, listing rows, history, lens, info,
  watch hits, diffs; the generate/edit/fork/diff requests); ``calls``: the other calls' requests
  and replies; ``typed``: ``Message``, how each is checked (one ``from_json`` per class);
- ``codec`` (re-exported here: ``wire.dumps``, ``wire.loads``, ``wire.encode_tensor`` …): JSON
  and ``(dtype, shape, bytes)`` tensors, validated on arrival;
- ``protocol``: the constants both ends agree on (the protocol version, the default port);
- ``transport``: rpyc's channel without compression, TCP_NODELAY, bounded frames;
- ``sidechannel``: a ticketed bulk socket for tensors of 1 MiB or more;
- ``tls``: both channels under TLS.

The layers' shape is client → wire ← serving → core: serving builds the messages from core's
runs (``serving.run_views``); a run's state is the shared ``djinn_nb.states.RunState``.
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
