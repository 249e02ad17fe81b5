"""What the bus raises: one family, `BusError`, so a caller can catch every bus failure."""

from __future__ import annotations

from shared import nats_client


class BusError(Exception):
    """Anything the bus could not do; catch this to handle every bus failure."""


class RequestTimeoutError(BusError, TimeoutError):
    """No reply, or the awaited state, within the timeout."""


class NoRespondersError(BusError):
    """Nobody listens on the request subject (answered at once by the server)."""


class RemoteError(BusError):
    """The responder received the request but failed; the message is its error."""

    def __init__(self, message: str, code: str = "500") -> None:
        super().__init__(message)
        self.code = code


class ObjectNotFoundError(BusError, FileNotFoundError):
    """No such key in the object store bucket."""


class PayloadTooLargeError(BusError):
    """The message is over the server's max_payload; sending it would close the connection."""


class PermissionDeniedError(BusError, nats_client.PermissionDeniedError):
    """The server refused a publish or subscription this call needed (the NATS user's
    permissions): raised at once, not after the call's timeout."""
