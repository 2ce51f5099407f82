"""`cmft serve` entry: check the options and the extra, load the model (and embed the corpus), run uvicorn.

SIGTERM or Ctrl-C stop accepting connections, let the requests in flight finish (at most `DRAIN_SECONDS`), stop the
batcher and exit 0.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

from cmft.errors import CmftError

log = logging.getLogger("cmft.serve")
DRAIN_SECONDS = 30
SERVE_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client"}


def check_extra() -> None:
    missing = []
    for module, name in SERVE_PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(name)
    if missing:
        raise CmftError(f'cmft serve needs {", ".join(missing)}: pip install "cmft[serve]"')


def read_api_key(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise CmftError(f"--api-key-file: {path}: cannot read it") from None
    if not key or any(c.isspace() for c in key):
        raise CmftError(f"--api-key-file: {path}: needs one key (no spaces) on its first line")
    return key


def check_port(host: str, port: int) -> None:
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise CmftError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None


def serve(source: Path, host: str = "127.0.0.1", port: int = 8080, onnx: bool = False, int8: bool = False,
          max_batch_tokens: int = 4096, max_batch_size: int = 16, max_wait_ms: float = 0.0, batching: bool = True,
          api_key_file: Path | None = None, corpus: Path | None = None, max_texts: int = 256,
          max_body_mb: float = 8.0, batch_size: int = 32, assertion: Path | None = None) -> None:  # fmt: skip
    check_extra()
    _plain_logging()
    if int8 and not onnx:
        raise CmftError("--int8 needs --onnx")
    if min(max_batch_tokens, max_batch_size, max_texts, batch_size) < 1 or max_wait_ms < 0 or max_body_mb <= 0:
        raise CmftError("--max-batch-tokens, --max-batch-size and --max-texts must be at least 1, "
                        "--max-wait-ms at least 0, --max-body-mb above 0")  # fmt: skip
    if assertion is not None and corpus is not None:
        raise CmftError("--assertion chains an assertion model after NER; it takes no --corpus")
    if not 0 < port < 65536:
        raise CmftError(f"--port {port}: not a TCP port")
    key = read_api_key(api_key_file)
    check_port(host, port)
    from cmft.inference import open_source

    loaded, backend = open_source(source, onnx, int8)
    if not loaded.task.predicts:
        raise CmftError(f"{source}: a pretrained encoder has no task head; fine-tune it first (cmft finetune RECIPE)")
    chain = None
    if assertion is not None:
        from cmft.chaining import open_chain

        chain = open_chain(loaded, source, assertion, onnx, int8)
    documents = None
    if corpus is not None:
        documents = embed_corpus(loaded, backend, corpus, batch_size)
    import uvicorn

    from cmft.serving.app import Settings, build_app
    from cmft.serving.batcher import Limits

    limits = Limits(max_batch_tokens, max_batch_size, max_wait_ms, batching)
    settings = Settings(limits, max_texts, int(max_body_mb * 2**20), key, backend.name, documents, chain)
    app = build_app(loaded, backend, settings)
    fast = {"http": "httptools"} if importlib.util.find_spec("httptools") else {}
    fast |= {"loop": "uvloop"} if importlib.util.find_spec("uvloop") else {}
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=DRAIN_SECONDS, **fast)  # fmt: skip
    server = DrainingServer(config)
    chained = f" + {chain.loaded.task.name} {chain.source}" if chain is not None else ""
    log.info("serving %s%s (%s, %s) on http://%s:%d%s", loaded.task.name, chained, backend.name,
             getattr(backend, "provider", ""), host, port, " with an API key" if key else "")  # fmt: skip
    server.run()


def embed_corpus(loaded, backend, corpus: Path, batch_size: int):
    """(document ids, embeddings) of a `--corpus` file, embedded once at start."""
    from cmft.inference import embed_corpus as embed

    if not loaded.task.searches:
        raise CmftError(f"--corpus: searching needs a retrieval model; this one is {loaded.task.name}")
    documents = embed(loaded, backend, corpus, batch_size)
    log.info("corpus: %d documents embedded", len(documents[0]))
    return documents


class DrainingServer:
    """uvicorn's Server, stopped by SIGTERM/SIGINT with a drain and exit status 0 (uvicorn re-raises the signal
    after its shutdown, which would end the process with the signal's status)."""

    def __init__(self, config) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                def stop(number, frame) -> None:
                    if self.should_exit:  # a second signal: stop now
                        self.force_exit = True
                    log.info("signal %d: draining requests in flight, then stopping", number)
                    self.should_exit = True

                previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

        self.server = Server(config)

    def run(self) -> None:
        self.server.run()


def _plain_logging() -> None:
    """A service logs one plain, timestamped line per event to stderr (the CLI's rich console is for people)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    for quiet in ("transformers", "sentence_transformers", "huggingface_hub", "httpx"):
        logging.getLogger(quiet).setLevel(logging.ERROR)
