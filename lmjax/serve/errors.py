"""Errors of the HTTP API in OpenAI's shape {"error": {"message", "type", "param", "code"}}, and the handlers that
give FastAPI's own errors (unknown path, wrong method, invalid JSON, a failed validation) that shape too."""

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class ApiError(Exception):
    """An error response in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 409: "conflict", 413: "invalid_request_error",
             422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


async def http_error(_: Request, e: HTTPException) -> JSONResponse:
    """Starlette's HTTP errors (404, 405, 413 from the body limit) as `ApiError`s."""
    message = {404: "no such endpoint", 405: "method not allowed"}.get(e.status_code, str(e.detail))
    return ApiError(e.status_code, message, code=str(e.status_code)).response()


async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    """A body that is not JSON (400) or does not validate (422, naming the first fields at fault)."""
    errors = e.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                        code="invalid_json").response()
    message = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body')}: {err.get('msg')}"
                        for err in errors[:5])
    return ApiError(422, message or "invalid request", where or None, "invalid_value").response()
