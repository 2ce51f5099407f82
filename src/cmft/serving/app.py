"""The `cmft serve` application (FastAPI): /predict, /search, /health, /ready, /info, /metrics.

Every head is served through its task's own encode/collate/decode (cmft.tasks), as `cmft predict` runs it, so the
two agree. Texts never reach a log line or an error body: logs carry a request id, sizes and timings only.
"""

import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, create_model, field_validator

from cmft.backends import Backend, per_text
from cmft.chaining import Chain
from cmft.errors import CmftError
from cmft.inference import Loaded, top_hits
from cmft.serving.batcher import Batcher, Limits
from cmft.serving.metrics import Metrics
from cmft.tasks.base import EVIDENCE_K
from cmft.version import __version__

log = logging.getLogger("cmft.serve")
OPEN_PATHS = {"/health", "/ready"}  # answered without the API key (load balancers, orchestrators)


@dataclass
class Settings:
    limits: Limits
    max_texts: int = 256
    max_body_bytes: int = 8 * 2**20
    api_key: str | None = None
    backend_name: str = "torch"
    corpus: tuple[list[str], np.ndarray] | None = None  # (document ids, their normalised embeddings)
    assertion: Chain | None = None  # NER: the assertion model that gives each entity its status


class TextsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr | list[StrictStr] = Field(description="One text or a list of texts.")

    @field_validator("text")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("needs at least one text")
        if any(not text.strip() for text in texts):
            raise ValueError("a text is empty")
        return value

    @property
    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


class SearchRequest(TextsRequest):
    top_k: int = Field(10, ge=1, le=1000, description="Hits per text.")


def predict_request(loaded: Loaded) -> type[TextsRequest]:
    """/predict's body: texts, the task's own per-request options (ICD coding: threshold, top_k) and evidence."""
    options: dict[str, Any] = {
        name: (kind | None, Field(None, gt=0)) for name, kind in loaded.task.decode_options.items()
    }
    options["evidence"] = (StrictBool, Field(False, description="ICD coding: each code's evidence spans."))
    options["evidence_k"] = (int | None, Field(None, ge=1, le=100, description=f"Spans per code ({EVIDENCE_K})."))
    return create_model("PredictRequest", __base__=TextsRequest, **options)


def build_app(loaded: Loaded, backend: Backend, settings: Settings) -> FastAPI:
    metrics = Metrics()
    batcher = Batcher(loaded, backend, settings.limits, metrics.observe)
    chain = settings.assertion
    chained = None if chain is None else Batcher(chain.loaded, chain.backend, settings.limits, metrics.observe)
    task = loaded.task
    Predict = predict_request(loaded)  # noqa: N806 (a class)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        if chained is not None:
            chained.start()
        app.state.ready = True
        yield
        app.state.ready = False
        await batcher.stop()
        if chained is not None:
            await chained.stop()

    app = FastAPI(title="cmft serve", version=__version__, lifespan=lifespan,
                  description=f"A cmft {task.name} model over HTTP.")  # fmt: skip
    app.state.ready = False

    app.add_middleware(Observe, metrics=metrics, max_body_bytes=settings.max_body_bytes, api_key=settings.api_key)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [{"field": _field(error), "problem": error["msg"]} for error in exc.errors()]  # never its input
        metrics.error("invalid_request")
        return JSONResponse({"error": "invalid request", "fields": fields}, status_code=422)

    evidence_backends: dict[tuple, Backend] = {}  # one per decode options: requests alike batch together

    def evidence_backend(meta: dict[str, Any]) -> Backend:
        key = tuple(meta.get(name) for name in task.decode_options)
        if key not in evidence_backends:
            try:
                evidence_backends[key] = task.evidence_backend(replace(loaded, meta=meta), backend, "attention")
            except CmftError as exc:
                raise HTTPException(400, str(exc)) from None
        return evidence_backends[key]

    async def run_texts(request: Request, texts: list[str], meta: dict[str, Any], own: Backend | None = None
                        ) -> list[tuple[list, list]]:  # fmt: skip
        if len(texts) > settings.max_texts:
            raise HTTPException(413, f"{len(texts)} texts in one request; at most {settings.max_texts}")
        request.state.texts = len(texts)
        units, _ = await run_in_threadpool(task.encode, loaded.tokenizer, texts, meta)
        try:
            outputs = await batcher.run(units, own)
        except Exception as exc:
            metrics.error("batch_failed")
            raise HTTPException(500, "the model failed on the batch holding this request") from exc
        return per_text(units, outputs, len(texts))

    def flags(units: list) -> dict[str, Any]:
        found: dict[str, Any] = {"truncated": any(unit.truncated for unit in units)}
        if task.windowed:
            found["windows"] = len(units)
        return found

    @app.post("/predict")
    async def predict(request: Request, body: Predict) -> dict[str, Any]:  # type: ignore[valid-type]
        """Per text, the JSON of `cmft predict` plus `truncated` (and `windows` for NER); with `"evidence": true`,
        each ICD code's `evidence` spans as `cmft predict --evidence` gives them."""
        options = {name: getattr(body, name) for name in task.decode_options if getattr(body, name) is not None}
        meta = {**loaded.meta, **options}
        own = None
        if body.evidence:
            meta["evidence"] = {"k": body.evidence_k or EVIDENCE_K, "method": "attention"}
            own = evidence_backend(meta)
        elif body.evidence_k is not None:
            raise HTTPException(400, "evidence_k needs evidence: true")
        texts = body.texts
        by_text = await run_texts(request, texts, meta, own)

        def decode() -> list[dict[str, Any]]:
            return [{**task.decode(meta, text, outputs, units), **flags(units)}
                    for text, (outputs, units) in zip(texts, by_text, strict=True)]  # fmt: skip

        predictions = await run_in_threadpool(decode)
        if chain is not None:
            await add_assertions(texts, predictions)
        return {"predictions": predictions}

    async def add_assertions(texts: list[str], predictions: list[dict[str, Any]]) -> None:
        """The assertion model's status on every entity of the request (cmft.chaining), its rows batched with those
        of other requests by a batcher of its own."""
        spans, inputs = chain.marked(loaded, texts, predictions)
        if not inputs:
            return
        units = await run_in_threadpool(chain.encode, inputs)
        try:
            outputs = await chained.run(units)
        except Exception as exc:
            metrics.error("batch_failed")
            raise HTTPException(500, "the assertion model failed on the batch holding this request") from exc
        chain.attach(spans, await run_in_threadpool(chain.decode, inputs, units, outputs))

    @app.post("/search")
    async def search(request: Request, body: SearchRequest) -> dict[str, Any]:
        """The top_k documents of the corpus (`--corpus`) for each text, by cosine similarity."""
        if settings.corpus is None:
            raise HTTPException(404, "no corpus loaded: start cmft serve with --corpus on a retrieval model")
        by_text = await run_texts(request, body.texts, loaded.meta)
        query = np.stack([np.asarray(outputs[0], dtype=np.float32) for outputs, _ in by_text])

        def rank() -> list[dict[str, Any]]:
            found = top_hits(query, settings.corpus, body.top_k)
            return [{**hits, **flags(units)} for hits, (_, units) in zip(found, by_text, strict=True)]

        return {"results": await run_in_threadpool(rank)}

    @app.get("/health")
    async def health() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """The model is loaded and the batcher runs."""
        if not app.state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/info")
    async def info() -> dict[str, Any]:
        """Task, labels, maximum length, backend and version; the chained assertion model, if any."""
        return {"task": task.name, "labels": loaded.meta.get("labels", []), "max_length": loaded.meta["max_length"],
                "backend": settings.backend_name, "provider": getattr(backend, "provider", None),
                "version": __version__, "search": settings.corpus is not None,
                "options": sorted(task.decode_options), "max_texts": settings.max_texts,
                "batching": settings.limits.__dict__, "assertion": None if chain is None else chain.info}  # fmt: skip

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text format: requests, latency, batch sizes, queue depth, errors."""
        metrics.observe("queue_depth", batcher.depth)
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def _field(error: dict[str, Any]) -> str:
    """The request field a validation error is about (`text`, `text.1`, `top_k`), or `body` for unreadable JSON."""
    if error.get("type") == "json_invalid":
        return "body"
    return ".".join(str(part) for part in error["loc"] if part != "body") or "body"


class Observe:
    """ASGI middleware, before anything reads the body: a request id (X-Request-ID), the API key (401, compared in
    constant time; /health and /ready stay open), the body-size limit (413; a POST must say its length, 411),
    metrics and one log line per request with sizes and timings only."""

    def __init__(self, app: Any, metrics: Metrics, max_body_bytes: int, api_key: str | None):
        self.app, self.metrics, self.limit = app, metrics, max_body_bytes
        self.key = api_key.encode() if api_key else None

    def authorized(self, headers: dict[bytes, bytes], path: str) -> bool:
        if self.key is None or path in OPEN_PATHS:
            return True
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token, self.key)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state["id"], state["texts"] = uuid.uuid4().hex[:12], 0
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"").decode()
        status = 500

        async def reply(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", state["id"].encode())]
            await send(message)

        try:
            if not self.authorized(headers, scope["path"]):
                response = _error(401, "missing or wrong API key (Authorization: Bearer …)")
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, reply)
            elif scope["method"] == "POST" and not length.isdigit():
                await _error(411, "a POST needs a Content-Length header")(scope, receive, reply)
            elif length.isdigit() and int(length) > self.limit:
                await _error(413, f"request body over {self.limit} bytes")(scope, receive, reply)
            else:
                await self.app(scope, receive, reply)
        finally:
            seconds = time.perf_counter() - started
            self.metrics.request(scope["path"], status, seconds)
            log.info("request %s %s %s %d texts=%d bytes=%s ms=%.1f", state["id"], scope["method"], scope["path"],
                     status, state["texts"], length or "0", seconds * 1000)  # fmt: skip
