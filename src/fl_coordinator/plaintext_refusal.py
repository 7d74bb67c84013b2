"""What a TLS port answers to a plaintext HTTP request (OpenSSL's ``HTTP_REQUEST``).

A browser, ``curl`` or ``fl-coordinator watch ws://...`` pointed at a TLS
port would otherwise see the connection closed without a word (or, for a
websocket client, wait out its handshake timeout). Both TLS listeners (the
gRPC port and the status port) answer such a request, in plaintext, with
this HTTP/1.1 400, whose body says what the port speaks and where to go.
"""

from __future__ import annotations

__all__ = ["plaintext_refusal"]


def plaintext_refusal(text: str) -> bytes:
    """An HTTP/1.1 400 response (``Connection: close``) whose plaintext body is ``text``
    and a newline, as bytes to send as they are."""
    body = f"{text}\n".encode()
    return (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
