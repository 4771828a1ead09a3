"""The HTTP listener: /metrics, /healthz and OpenAI's /v1/embeddings and /v1/models, on the proxy's
own event loop and with its one engine (aiohttp's server: HTTP/1.1 framing, keep-alive and body
limits done by a well-kept library, not by us).

Bodies are bounded (413 past `max_body`), and a large one is decoded and its answer encoded in a
worker thread, so that a 10 MB request does not stall every session's relaying. A client that goes
away cancels its request, and the engine drops its queued inputs."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from inference.engine import Usage

from .embeddings_api import (
    ApiError,
    EmbeddingsRequest,
    check_dimensions,
    embeddings_response,
    from_call_error,
    models_response,
    parse_embeddings_request,
)
from .health import HealthCheck
from .intercept.errors import CallError
from .intercept.evaluate import run
from .intercept.functions import Backend
from .intercept.signatures import DEFAULT_BATCH_SIZE, DEFAULT_TIMEOUT_MS
from .metrics import Metrics
from .stats import STATS

log = logging.getLogger("azure_local_ai_proxy.http")

#: Bodies (and answers of as many vectors) past these sizes are decoded (encoded) in a worker thread.
THREAD_BODY = 1 << 16
THREAD_VECTORS = 16
PATHS = ("/metrics", "/healthz", "/v1/embeddings", "/v1/models")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpApi:
    """The routes, over the proxy's backend (engine and catalog), metrics and health check."""

    def __init__(self, backend: Backend, metrics: Metrics, health: HealthCheck, *, api_key: str, max_body: int) -> None:
        self.backend = backend
        self.metrics = metrics
        self.health = health
        self.api_key = api_key
        self.max_body = max_body

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body, middlewares=[self._counted])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        return app

    @web.middleware
    async def _counted(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count every request by path and status; answer /v1 errors (and unknown paths) in OpenAI's shape."""
        started = time.perf_counter()
        path = request.path if request.path in PATHS else "other"
        try:
            response = await self._api_errors(request, handler) if path.startswith("/v1/") else await handler(request)
        except web.HTTPException as exc:
            response = _error(ApiError(exc.status, exc.reason, kind="invalid_request_error"))
        STATS.http_requests[(path, str(response.status))] += 1
        STATS.http_seconds[path].observe(time.perf_counter() - started)
        return response

    async def _api_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            self._authorize(request)
            return await handler(request)
        except ApiError as exc:
            if exc.sqlstate is not None:
                STATS.error(exc.sqlstate, "http")
            return _error(exc)
        except web.HTTPException as exc:  # aiohttp's own: 404, 405
            return _error(ApiError(exc.status, exc.reason))
        except Exception:
            log.exception("HTTP request failed", extra={"event": "http_error", "path": request.path})
            STATS.error("XX000", "http")
            return _error(ApiError(500, "internal error in azure-local-ai-proxy", kind="server_error"))

    def _authorize(self, request: web.Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "Missing API key: send it as 'Authorization: Bearer KEY' (the proxy's http_api_key).",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    # ------------------------------------------------------------------ routes

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=await self.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _healthz(self, request: web.Request) -> web.Response:
        problems = await self.health.problems()
        warnings = self.health.warnings()
        if problems:
            return web.json_response({"status": "unavailable", "problems": problems, "warnings": warnings}, status=503)
        return web.json_response({"status": "ok", "warnings": warnings} if warnings else {"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        records = await asyncio.to_thread(self.backend.catalog.list_models)
        return web.json_response(models_response(records))

    async def _embeddings(self, request: web.Request) -> web.Response:
        parsed = parse_embeddings_request(await self._json_body(request))
        try:
            files = await self.backend.model_files(parsed.model)
            check_dimensions(parsed, files.dimensions)
            vectors, tokens = await self._embed(parsed)
        except CallError as exc:
            raise from_call_error(exc) from exc
        encode = partial(_embeddings_body, parsed, vectors, tokens)
        body = await asyncio.to_thread(encode) if len(vectors) > THREAD_VECTORS else encode()
        return web.Response(body=body, content_type="application/json")

    async def _embed(self, parsed: EmbeddingsRequest) -> tuple[list, int]:
        """Exactly as SQL's create_embeddings(model, input) or create_embeddings(model, inputs), with their
        defaults: the same function, the same engine, the same batching."""
        usage = Usage()
        if parsed.single:
            args: dict[str, object] = {"model_uri": parsed.model, "input": parsed.inputs[0],
                                       "timeout_ms": DEFAULT_TIMEOUT_MS}
            value = await run("create_embeddings", args, self.backend, origin="http", usage=usage)
            return [value.value], usage.tokens
        args = {"model_uri": parsed.model, "inputs": parsed.inputs, "batch_size": DEFAULT_BATCH_SIZE,
                "timeout_ms": DEFAULT_TIMEOUT_MS}
        value = await run("create_embeddings", args, self.backend, origin="http", usage=usage)
        return list(value.value), usage.tokens  # type: ignore[call-overload]

    async def _json_body(self, request: web.Request) -> object:
        """The request's body, decoded; whatever keeps it from being read as JSON is the client's error (400)."""
        if request.content_length is not None and request.content_length > self.max_body:
            raise ApiError(413, f"The request body is {request.content_length} bytes; at most {self.max_body} "
                           "are accepted (the proxy's http_max_body).")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise ApiError(413, f"The request body is larger than {self.max_body} bytes (the proxy's "
                           "http_max_body).") from exc
        try:
            return await asyncio.to_thread(json.loads, raw) if len(raw) > THREAD_BODY else json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"The request body is not valid JSON: {exc}") from exc
        except RecursionError as exc:  # the decoder's depth limit, which it reports as no ValueError
            raise ApiError(400, "The request body nests JSON arrays or objects too deeply to be decoded "
                           "(an embeddings request needs two levels).") from exc


def _embeddings_body(parsed: EmbeddingsRequest, vectors: list, tokens: int) -> bytes:
    return json.dumps(embeddings_response(parsed, vectors, tokens), separators=(",", ":")).encode()


def _error(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


class HttpListener:
    """Serves an HttpApi on one address of the running event loop."""

    def __init__(self, api: HttpApi, host: str, port: int) -> None:
        self.api = api
        self.host = host
        self.requested_port = port
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def port(self) -> int:
        assert self._runner is not None
        return self._runner.addresses[0][1]

    async def start(self) -> None:
        # handler_cancellation: a client that leaves cancels its request (and the engine drops its work).
        self._runner = web.AppRunner(self.api.application(), access_log=None, handler_cancellation=True,
                                     shutdown_timeout=5.0)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self.requested_port, reuse_address=True)
        await self._site.start()
        log.info("HTTP listening", extra={"event": "http_listening", "address": f"{self.host}:{self.port}"})

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
