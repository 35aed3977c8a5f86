"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

:class:`APIError` is what the handlers raise; :func:`install_handlers` turns it, FastAPI's validation errors
(malformed JSON, wrong types: 400 instead of FastAPI's 422), Starlette's HTTP errors (unknown route: 404,
wrong method: 405) and, as a last resort, any bug (500, logged with its traceback) into that shape.
:func:`from_engine_error` maps the engine's user errors to statuses.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from longctx.errors import LongctxError, PromptTooLongError, QueueFullError, RequestTooLargeError, SpecError

log = logging.getLogger("longctx.server")

RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    """An error answered to the client (never a bug): status, OpenAI error fields, extra headers."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable", code="shutting_down",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def from_engine_error(e: Exception) -> APIError:
    """The answer to an error the engine raised while admitting a request."""
    from longctx.engine.async_engine import EngineStoppedError  # noqa: PLC0415

    if isinstance(e, QueueFullError):
        return APIError(429, str(e), type="rate_limit_exceeded", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(e, EngineStoppedError):
        return unavailable(str(e))
    if isinstance(e, SpecError):
        return bad_request(str(e), param="kv", code="invalid_kv_spec")
    if isinstance(e, PromptTooLongError):
        return bad_request(str(e), param="prompt", code="context_length_exceeded")
    if isinstance(e, RequestTooLargeError):
        return bad_request(str(e), param="max_tokens", code="request_too_large")
    if isinstance(e, (LongctxError, ValueError)):
        return bad_request(str(e))
    raise e


def describe_validation(errors: list[dict[str, Any]]) -> APIError:
    """One readable 400 from pydantic's error list (the first error, and how many more there are)."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc)
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return bad_request(f"the request body is not valid JSON ({detail})" if detail else
                           "the request body is not valid JSON", code="invalid_json")
    if kind == "extra_forbidden":
        message = f"unknown field {where!r} (not an OpenAI or longctx parameter of this endpoint)"
    elif kind == "missing":
        message = f"missing required field {where!r}" if where else "missing request body"
    else:
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid body")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return bad_request(message, param=where or None, code="invalid_value")


def install_handlers(app: Any) -> None:
    """Answer every failure of ``app`` (a FastAPI app) in OpenAI's error shape."""
    from fastapi.exceptions import RequestValidationError  # noqa: PLC0415

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = list(e.errors())
        content_type = request.headers.get("content-type", "")
        if errors and tuple(errors[0].get("loc", ())) == ("body",) and "json" not in content_type.lower():
            return bad_request(f"the request body must be JSON sent with 'Content-Type: application/json' (got "
                               f"{content_type or 'no Content-Type'})", code="invalid_content_type").response()
        return describe_validation(errors).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed"}
        message = str(e.detail)
        if e.status_code == 400:  # FastAPI could not read the body at all (e.g. nested too deeply)
            message = f"the request body could not be parsed: {message}"
        return APIError(e.status_code, message, code=kinds.get(e.status_code), headers=dict(e.headers or {})
                        ).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return APIError(500, f"internal error ({type(e).__name__}); see the server log", type="server_error",
                        code="internal_error").response()
