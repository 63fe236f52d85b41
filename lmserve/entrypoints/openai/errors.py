"""OpenAI-style errors: every failure leaves the server as `{"error": {"message", "type",
"param", "code"}}` with a 4xx/5xx status, never as FastAPI's default shapes.

Handlers convert, in order of preference:
  OpenAIError                 raised by our own code (it knows status, param and code)
  pydantic ValidationError    a request body of the wrong shape            → 400
  ValueError                  the engine's input validation (names field)  → 400
  EngineDeadError             the EngineCore is gone                       → 503
  Starlette HTTPException     unknown route (404), wrong method (405)
  anything else               a bug                                         → 500 (logged)
The router shares this module without the engine: only install_error_handlers imports it.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
AUTHENTICATION = "authentication_error"
SERVER_ERROR = "server_error"
SERVICE_UNAVAILABLE = "service_unavailable_error"


class OpenAIError(Exception):
    """An error with everything the response needs."""

    def __init__(
        self,
        message: str,
        status_code: int = HTTPStatus.BAD_REQUEST,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = int(status_code)
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = INVALID_REQUEST, param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: OpenAIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, HTTPStatus.BAD_REQUEST, INVALID_REQUEST, param, code)


def engine_dead(e: BaseException | None = None) -> OpenAIError:
    detail = f": {e}" if e is not None and str(e) else ""
    return OpenAIError(
        f"the inference engine is not running{detail}; the server is shutting down",
        HTTPStatus.SERVICE_UNAVAILABLE,
        SERVICE_UNAVAILABLE,
        code="engine_dead",
    )


# ---- ValueError / ValidationError → 400 -----------------------------------------------------
# The engine's messages name the field first: "SamplingParams.top_p=2 is invalid: ...",
# "logit_bias token id 999 is out of range ...", "prompt token id -1 is out of range ...".
_PARAM_PATTERNS = [
    (re.compile(r"SamplingParams\.(\w+)"), None),
    (re.compile(r"^(logit_bias|stop_token_ids)\b"), None),
    (re.compile(r"^(\w+)="), None),  # "min_tokens=5 must be <= max_tokens=2"
    (re.compile(r"\bprompt\b"), "prompt"),
]


def param_from_message(message: str, prompt_param: str = "prompt") -> str | None:
    """Best guess at the request field a ValueError from the engine is about."""
    for pattern, fixed in _PARAM_PATTERNS:
        match = pattern.search(message)
        if match:
            param = fixed or match.group(1)
            return prompt_param if param == "prompt" else param
    return None


def from_value_error(e: ValueError, prompt_param: str = "prompt") -> OpenAIError:
    message = str(e) or type(e).__name__
    return invalid_request(message, param_from_message(message, prompt_param))


def from_validation_error(e: ValidationError | RequestValidationError) -> OpenAIError:
    """The first problem, as `field.path: what is wrong (got ...)`."""
    errors = e.errors()
    if not errors:
        return invalid_request("invalid request body")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = _join_loc(loc) or None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "missing":
        message = f"'{param}' is a required property"
    elif err.get("type") == "extra_forbidden":
        message = f"'{param}' is not a recognised field"
    else:
        got = _short_repr(err.get("input"))
        message = f"{param}: {msg} (got {got})" if param else msg
    more = len(errors) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return invalid_request(message, param)


def _join_loc(loc: list[str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- handlers -------------------------------------------------------------------------------
def install_error_handlers(app: FastAPI) -> None:
    """Every handler: the engine-free ones plus EngineDeadError → 503."""
    from lmserve.engine.core_client import EngineDeadError

    install_http_error_handlers(app)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return error_response(engine_dead(e))


def install_http_error_handlers(app: FastAPI) -> None:
    """The handlers that need no engine (the router uses these alone)."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(from_validation_error(e))

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, e: ValidationError) -> JSONResponse:
        return error_response(from_validation_error(e))

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, e: ValueError) -> JSONResponse:
        return error_response(from_value_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = NOT_FOUND if e.status_code == 404 else INVALID_REQUEST
        if e.status_code >= 500:
            type_ = SERVER_ERROR
        error = OpenAIError(str(e.detail), e.status_code, type_)
        return error_response(error, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unexpected error while handling a request")
        error = OpenAIError(
            f"internal server error: {type(e).__name__}",
            HTTPStatus.INTERNAL_SERVER_ERROR,
            SERVER_ERROR,
        )
        return error_response(error)
