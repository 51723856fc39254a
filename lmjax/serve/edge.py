"""The HTTP edge of the API server: ASGI middleware that every request passes before and after FastAPI."""

import json
import logging
import secrets
import time
from collections.abc import Callable

from fastapi import FastAPI
from starlette.exceptions import HTTPException

from lmjax.serve.errors import ApiError
from lmjax.serve.metrics import Metrics

access_log = logging.getLogger("lmjax.access")
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})  # others count as "other"


class Edge:
    """ASGI middleware around the app: request ids, the body-size limit (413), HTTP metrics and the JSON access
    log (request id, key name, tokens, latency, status; the prompt when the endpoint put it in the request's
    state). Paths outside `known_paths` count as "unmatched", so scans cannot grow the metrics' label sets."""

    def __init__(self, app: FastAPI, metrics: Metrics, max_body_bytes: int, known_paths: set[str]):
        self.app, self.metrics, self.limit, self.known = app, metrics, max_body_bytes, known_paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = secrets.token_hex(8)
        state = scope.setdefault("state", {})
        status = {"code": 500}
        limit = self.limit

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        received = {"bytes": 0}

        async def limited_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                received["bytes"] += len(message.get("body", b""))
                if received["bytes"] > limit:
                    raise HTTPException(413, f"the request body is larger than {limit} bytes")
            return message

        try:
            length = dict(scope.get("headers", [])).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await ApiError(413, f"the request body is {int(length)} bytes; the limit is {limit}",
                               code="body_too_large").response()(scope, receive, send_with_id)
            else:
                await self.app(scope, limited_receive, send_with_id)
        finally:
            path = scope.get("path", "")
            route = scope.get("route")
            handler = getattr(route, "path", path if path in self.known else "unmatched")
            method = scope.get("method", "")
            self.metrics.http(handler, method if method in HTTP_METHODS else "other", status["code"])
            record = {"time": round(time.time(), 3), "request_id": request_id, "method": scope.get("method"),
                      "path": path, "status": status["code"], "key": state.get("key_name"),
                      "latency_s": round(time.perf_counter() - start, 4), **(state.get("usage") or {})}
            if "prompt" in state:
                record["prompt"] = state["prompt"]
            access_log.info(json.dumps(record, ensure_ascii=False))
