"""How the service refuses a request: the status code is part of the contract."""

from __future__ import annotations

import grpc

UNPARSABLE = "request bytes are not a valid protobuf message of this method"


class RequestError(Exception):
    """A request refused before compute, with the status the caller gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
