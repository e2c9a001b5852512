"""TLS for both channels (rpyc and the bulk side channel), with the standard ``ssl`` module.

The server loads one certificate and key for both listeners; a client verifies
the certificate against the system CAs (``tls=True``) or one CA file
(``tls_ca=FILE``), hostname included. Handshakes run on the connection's own
thread with a deadline, so a peer that stalls in the handshake delays nobody.
"""
from __future__ import annotations

import socket
import ssl
from typing import Callable

from ..errors import BadRequestError, TransportError

#: Seconds a peer has to finish the TLS handshake.
HANDSHAKE_SECONDS = 10.0


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise BadRequestError(f"cannot load TLS certificate {cert} / key {key}: {e}") from None
    return ctx


def client_context(tls: bool = False, tls_ca: str | None = None) -> ssl.SSLContext | None:
    """None for a plain connection; else a verifying context (system CAs, or ``tls_ca`` only)."""
    if not tls and tls_ca is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=tls_ca) if tls_ca else ssl.create_default_context()
    except (OSError, ssl.SSLError) as e:
        raise BadRequestError(f"cannot load CA file {tls_ca}: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx  # CERT_REQUIRED and check_hostname are its defaults


def accept(ctx: ssl.SSLContext, sock: socket.socket, timeout: float = HANDSHAKE_SECONDS,
           on_wrap: Callable[[ssl.SSLSocket], None] = lambda tls: None) -> ssl.SSLSocket:
    """The server side of a handshake on an accepted socket (``OSError`` if it fails or stalls).

    Wrapping detaches ``sock`` (its descriptor moves to the TLS socket): ``on_wrap`` is told the
    new socket before the handshake, so whoever may need to hang up on it can."""
    tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    on_wrap(tls)
    try:
        tls.settimeout(timeout)
        tls.do_handshake()
        tls.settimeout(None)
    except BaseException:
        tls.close()
        raise
    return tls


def connect(ctx: ssl.SSLContext | None, sock: socket.socket, host: str, what: str,
            timeout: float = HANDSHAKE_SECONDS) -> socket.socket:
    """The client side: wrap and verify (certificate and hostname), or raise ``TransportError``."""
    if ctx is None:
        return sock
    try:
        tls = ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        tls.settimeout(timeout)
        tls.do_handshake()
        return tls
    except ssl.SSLCertVerificationError as e:
        sock.close()
        raise TransportError(f"{what}: the server's TLS certificate is not trusted: {e.verify_message}") from None
    except (OSError, ssl.SSLError) as e:
        sock.close()
        raise TransportError(f"{what}: TLS handshake failed ({e}); is the server serving TLS (--tls-cert)?") from None
