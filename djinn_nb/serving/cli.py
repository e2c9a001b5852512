"""``djinn-server`` (or ``python -m djinn_nb.serving``): load a model and serve it."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from . import wire
from .protocol import DEFAULT_PORT
from .server import DEFAULT_LEASE_SECONDS, DjinnServer, build_engine, is_loopback


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="djinn-server", description="Serve a causal LM with breakpoints over rpyc.")
    p.add_argument("--model", default=None, help="hub id, local directory, 'embedded' (default) or 'random:<shape>'")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 (default cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    p.add_argument("--device-map", default=None, help="'auto' splits the model over GPUs (accelerate)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--token", default=os.environ.get("DJINN_TOKEN"), help="required off loopback (or DJINN_TOKEN)")
    p.add_argument("--max-payload-bytes", type=int, default=wire.DEFAULT_MAX_PAYLOAD)
    p.add_argument("--lease-seconds", type=float, default=DEFAULT_LEASE_SECONDS,
                   help="close runs untouched this long (default 600)")
    p.add_argument("--max-paused-bytes", type=int, default=None,
                   help="offload least-recently-used paused runs to host memory above this many device bytes")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="keep forks on the eager path (default: replay the layers after a checkpoint as a CUDA graph)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not is_loopback(args.host) and not args.token:
        print(
            f"djinn-server: refusing to bind {args.host} without a token; pass --token SECRET or set DJINN_TOKEN",
            file=sys.stderr,
        )
        return 2
    engine = build_engine(args.model, args.device, args.dtype, args.device_map, cuda_graphs=False if args.no_cuda_graphs else None)
    server = DjinnServer(
        engine, args.host, args.port, args.token, args.max_payload_bytes, args.lease_seconds, args.max_paused_bytes
    )
    info = engine.info()
    print(f"djinn-server: {info['model']} ({info['num_layers']} layers) on {info['device']} at {server.address}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


