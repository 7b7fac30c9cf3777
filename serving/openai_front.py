"""An OpenAI-compatible HTTP front over Triton: clients switch from a teacher's API to the served student (or the
served teacher) by changing a base URL.

``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (server-sent events with ``stream``), OpenAI's
schema plus vLLM's ``echo`` prompt log-probs and ``return_tokens_as_token_ids``. Two kinds of Triton model can
stand behind it, told apart by the config parameter ``kdops_kind``:

- a causal-LM student (serving/templates/lm_model.py, the stable name of serving.swap): prompt text in, text out;
  streaming over gRPC when it was exported with ``ExportConfig.streaming``. It has no log-probs: a request asking
  for them gets ``logprobs: null``. ``system_fingerprint`` is the MODEL_VERSION that answered.
- an LM teacher (``kdops_kind = "lm-teacher"``, serving.teacher.deploy_lm_teacher): the front tokenises with the
  tokenizer directory it is given. Greedy text is one GENERATED call; the log-probs of the returned tokens are a
  second, top-k call on prompt + generated. ``temperature > 0`` samples in the front from the teacher's top 50 at
  each step (HF ``generate``'s default top_k), one call per token.

Triton is called by model name without a version, so whichever version serves answers and a hot swap is invisible.
Errors are OpenAI's JSON (``{"error": {message, type, code, param}}``): 400 for a request that cannot be answered as
sent, 404 for an unknown model, 503 while Triton cannot be reached. Only serving/ talks to Triton; this module
reaches it through ``serving.client.ServingClient`` and ``serving.teacher.TritonLMTeacher``. The schema (parsing,
rendering, errors) is serving/openai_schema.py; the two backends are serving/openai_backends.py.
"""

# No `from __future__ import annotations`: FastAPI reads the route parameters' annotations (Request) at runtime.
import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from serving.client import ServingClient, ServingError
from serving.openai_backends import StudentBackend, TeacherBackend
from serving.openai_schema import APIError, _triton_failure, bad, parse_chat, parse_completion, render

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrontConfig:
    triton_url: str = field(metadata={"help": "Triton's HTTP host:port."})
    model: str = field(metadata={"help": "The Triton model to serve (a causal-LM student's stable name, or an LM teacher)."})
    grpc_url: str = field(default="", metadata={"help": "Triton's gRPC host:port: needed to stream from a streaming (decoupled) student."})
    served_name: str = field(default="", metadata={"help": "The model id clients send and /v1/models lists (empty: the Triton name)."})
    tokenizer: str = field(default="", metadata={"help": "Tokenizer directory: required for an LM teacher; for a student it only counts prompt tokens in usage (else 0)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on."})
    port: int = field(default=0, metadata={"help": "Port to listen on (0: a free one)."})
    timeout_s: float = field(default=120.0, metadata={"help": "Longest wait for one Triton call or streamed piece."})
    max_n: int = field(default=16, metadata={"help": "The most answers per prompt (n) a request may ask for."})
    teacher_batch: int = field(default=16, metadata={"help": "LM teacher: sequences per Triton call."})
    api_key_env: str = field(default="", metadata={"help": "Environment variable holding the key clients must send as `Authorization: Bearer KEY` (empty: no key; the front is then as open as its address)."})
    threads: int = field(default=32, metadata={"help": "Threads that call Triton: the most requests in flight at once."})

    def __post_init__(self) -> None:
        if not self.triton_url or not self.model:
            raise ValueError("FrontConfig needs triton_url and model.")
        if not 0 <= self.port <= 65535 or self.timeout_s <= 0 or min(self.max_n, self.teacher_batch, self.threads) < 1:
            raise ValueError("port must be in [0, 65535], timeout_s > 0, and max_n, teacher_batch, threads >= 1.")

    @property
    def name(self) -> str:
        return self.served_name or self.model


# -- the front ----------------------------------------------------------------------------------------------


class Front:
    """The state behind the HTTP app: config, Triton client and the backend (found on first use)."""

    def __init__(self, cfg: FrontConfig):
        self.cfg = cfg
        self.client = ServingClient(cfg.triton_url, grpc_url=cfg.grpc_url, timeout_s=cfg.timeout_s)
        self._backend = None
        self._lock = threading.Lock()
        # Long-lived threads of its own (not anyio's, which exit when idle): each keeps its Triton client (one per
        # thread, serving.client), and gevent's per-thread hub is not torn down and rebuilt between requests.
        self.pool = ThreadPoolExecutor(cfg.threads, thread_name_prefix="openai-front")

    async def call(self, fn, *args):
        """``fn(*args)`` on the front's threads, Triton's failures as API errors."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.run, fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def backend(self):
        """The backend for the served model, from its config (``kdops_kind``); 503 while Triton is unreachable."""
        if self._backend is not None:
            return self._backend
        with self._lock:
            if self._backend is None:
                try:
                    config = self.client.model_config(self.cfg.model)
                except Exception as e:  # Triton down, or the model not loaded (yet): both pass, both are 503
                    raise APIError(503, f"{self.cfg.model} is not available on the model server ({e})") from e
                kind = config.get("parameters", {}).get("kdops_kind", {}).get("string_value", "")
                if kind == "lm-teacher":
                    try:
                        self._backend = TeacherBackend(self.cfg)
                    except (ValueError, OSError) as e:  # no tokenizer given, or not a tokenizer directory
                        raise APIError(500, str(e)) from e
                elif {"PROMPT", "COMPLETION"} <= _tensor_names(config):
                    tok = None
                    if self.cfg.tokenizer:
                        from transformers import AutoTokenizer

                        tok = AutoTokenizer.from_pretrained(self.cfg.tokenizer)
                    decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled"))
                    self._backend = StudentBackend(self.client, self.cfg.model, decoupled, tok)
                else:
                    raise APIError(500, f"{self.cfg.model} is neither a causal-LM student nor an LM teacher "
                                        f"(kdops_kind={kind!r}); this front serves generation models only")
        return self._backend

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise bad("'model' is required", "model")
        if name != self.cfg.name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.cfg.name}`.", "model")

    def run(self, fn, *args):
        """A backend call, Triton's failures as API errors."""
        try:
            return fn(*args)
        except APIError:
            raise
        except (ServingError, OSError) as e:
            raise _triton_failure(e, self.client) from e


def _tensor_names(config: dict) -> set[str]:
    return {t["name"] for t in config.get("input", []) + config.get("output", [])}


def _close_after(step, events) -> None:
    if step is not None:
        wait([step])
    events.close()


def create_app(front: Front):
    """The FastAPI app of ``front``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="kdops OpenAI-compatible front", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        err = APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):  # never a traceback to the client; the log keeps it
        log.exception("openai front: %s %s failed", request.method, request.url.path)
        return JSONResponse(APIError(500, f"internal error ({type(e).__name__})").body(), status_code=500)

    def ok(payload: dict) -> Response:
        return Response(json.dumps(payload, ensure_ascii=False), media_type="application/json")

    key = os.environ.get(front.cfg.api_key_env, "") if front.cfg.api_key_env else ""
    if front.cfg.api_key_env and not key:
        raise ValueError(f"${front.cfg.api_key_env} is empty: set the key the front's clients must send, or no api_key_env.")

    @app.middleware("http")
    async def _key(request: Request, call_next):  # inference behind a key, as hosted APIs are; /health stays open
        if key and request.url.path != "/health":
            sent = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(sent.encode(), key.encode()):
                err = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        model = {"id": front.cfg.name, "object": "model", "created": 0, "owned_by": "kdops"}
        return ok({"object": "list", "data": [model]})

    @app.get("/health")
    async def health():
        live = await front.call(front.client.model_ready, front.cfg.model)
        return JSONResponse({"ready": live}, status_code=200 if live else 503)

    async def read(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not JSON ({e})") from e
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        front.check_model(body)
        return body

    async def answer(request: Request, chat: bool):
        body = await read(request)
        backend = front._backend or await front.call(front.backend)  # found once; no thread hop after
        ask, opts = (parse_chat if chat else parse_completion)(body, front.cfg, backend)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        meta = {"id": rid, "created": int(time.time()), "model": front.cfg.name}
        if not opts["stream"]:
            answers = await front.call(backend.complete, ask)
            return ok(render.response(answers, meta, chat, opts, backend))
        pieces = backend.stream(ask)
        # the first piece before any byte is sent: a refused request still gets its status code
        first = await front.call(next, pieces)
        events = render.events(first, pieces, meta, chat, opts, backend, front, len(ask.prompts))

        async def send():
            step = None
            try:
                while True:
                    step = front.pool.submit(next, events, None)  # events never raise: errors become events
                    event = await asyncio.wrap_future(step)
                    if event is None:
                        return
                    yield event
            finally:  # the stream ended or its client went away: close it (and its Triton stream) once idle
                front.pool.submit(_close_after, step, events)

        return StreamingResponse(send(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    return app


# -- running it ---------------------------------------------------------------------------------------------


class OpenAIFront:
    """The front in a background thread of this process: ``start()``, ``url`` (``http://host:port``), ``stop()``;
    a context manager. Flows start it with a ``FrontConfig``."""

    def __init__(self, cfg: FrontConfig):
        self.cfg = cfg
        self.front = Front(cfg)
        self._server = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self, timeout_s: float = 30.0) -> "OpenAIFront":
        import uvicorn

        if self._thread is not None:
            raise RuntimeError("the front is already running")
        sock, self.url = _bind(self.cfg)
        self._server = uvicorn.Server(_uvicorn_config(self.front, "warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="openai-front",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the OpenAI front did not start at {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._server = self._thread = None
        self.front.close()
        self.front = Front(self.cfg)  # a fresh one for a later start()

    def __enter__(self) -> "OpenAIFront":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _bind(cfg: FrontConfig) -> tuple[socket.socket, str]:
    """The listening socket, bound here so that port 0 becomes a free port without a race; and the base URL."""
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    sock.listen(2048)  # listening now: a client told the URL before uvicorn runs waits instead of being refused
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return sock, f"http://{host}:{sock.getsockname()[1]}"


def _uvicorn_config(front: Front, log_level: str):
    import uvicorn

    return uvicorn.Config(create_app(front), log_level=log_level, access_log=False, lifespan="off",
                          timeout_keep_alive=30)


def serve_forever(cfg: FrontConfig, announce=print) -> None:
    """Run the front in the foreground (``kdops serve openai``) until interrupted; ``announce(url)`` once it listens.
    A model that is not a generation model fails here; an unreachable Triton only warns (requests get 503 until it
    answers)."""
    import uvicorn

    front = Front(cfg)
    try:
        front.backend()
    except APIError as e:
        if e.status != 503:
            raise ValueError(e.message) from e
        log.warning("%s; serving anyway: requests get 503 until Triton answers", e.message)
    sock, url = _bind(cfg)
    announce(url)
    try:
        uvicorn.Server(_uvicorn_config(front, "info")).run(sockets=[sock])
    finally:
        front.close()
