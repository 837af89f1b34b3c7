"""The server's limits on what one client may ask for, with their defaults (docs/server.md).

Each one is checked before the work it protects: the body size before the body is read, the
prompt's length in characters before it is tokenized, the sequences a request brings before
anything is queued. A request over a limit gets a 4xx naming it; a full queue gets a 503 with
`Retry-After`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServerLimits"]


@dataclass(frozen=True)
class ServerLimits:
    """Args:
    max_body_bytes: the largest request body; a larger one gets 413 before it is read.
    max_sequences_per_request: prompts x `n` one request may ask for; more get 400.
    max_waiting: sequences (prompts x `n`) waiting for the engine, all requests together; a
        request that would go over gets 503 with `Retry-After`, one that could never fit 400.
    body_timeout: seconds a client has to send a whole request body once its headers are in;
        after that it gets 408 and the connection is closed.
    header_timeout: seconds a connection may stay open without a complete request head (a new
        connection, or one idle after a response); then it is closed.
    retry_after: the seconds a 503 asks the client to wait (`Retry-After`).
    """

    max_body_bytes: int = 4 << 20
    max_sequences_per_request: int = 256
    max_waiting: int = 256
    body_timeout: float = 30.0
    header_timeout: float = 30.0
    retry_after: int = 1

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_sequences_per_request", "max_waiting", "retry_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("body_timeout", "header_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
