"""Errors a client can cause, in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from http import HTTPStatus

# OpenAI's error types by status; vLLM and the openai client read them the same way.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI's fields."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = _TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.code or HTTPStatus(self.status).phrase.lower().replace(" ", "_"),
            }
        }
