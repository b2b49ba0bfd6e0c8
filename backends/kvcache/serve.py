"""Our engine as a Ray Serve application speaking OpenAI-compatible streaming ``/v1/completions``.

One replica owns one ``LLMEngine``. The engine is stepped by a background thread
(``EngineLoop``): HTTP handlers put new requests in an inbox, the thread admits them at step
boundaries, steps the engine, and pushes each request's new tokens to that request's asyncio
queue, from which the handler streams server-sent events in the same format as vLLM's server
(one chunk per token, ``token_ids`` included, a final ``usage`` chunk when
``stream_options.include_usage`` is set). So the same client measures vLLM and our engine.

Routes: ``POST /v1/completions`` (streaming or not; prompt as text or token ids),
``POST /v1/chat/completions`` (streaming or not; messages rendered with the model's chat
template), both honouring ``temperature``, ``top_p`` and ``seed`` (backends/kvcache/sampling.py)
and refusing any parameter they do not implement with a 400 naming it (openai_api.py);
``GET /v1/models``, ``GET /health``, and ``GET /metrics`` (Prometheus text with vLLM's metric
names for running/waiting/KV usage/preemptions, plus ``orch:`` byte counters), so vLLM's
tooling and our ``/metrics`` sampler read both servers alike. Bound to 127.0.0.1 by default.

    from backends.kvcache.serve import deploy
    url = deploy(EngineConfig(model="smollm2-135m", weights="real"), port=8000)  # http://127.0.0.1:8000
"""

# No `from __future__ import annotations`: FastAPI reads the route handlers' annotations at run
# time, in a replica where the pickled class's string annotations would not resolve.
import asyncio
import itertools
import json
import queue
import threading
import time
import uuid
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve

from backends.kvcache.config import EngineConfig
from backends.kvcache.openai_api import ChatCompletionRequest, CompletionRequest, TextStream, parse_request
from backends.kvcache.sampling import SamplingParams

_IDLE_WAIT_S = 0.05


class EngineLoop:
    """Steps one ``LLMEngine`` in a thread; requests in through an inbox, tokens out per request."""

    def __init__(self, engine: Any):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self.stats = engine.stats()
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, request_id: str, prompt_ids: list[int], max_tokens: int, ignore_eos: bool,
               sampling: SamplingParams | None = None) -> asyncio.Queue:
        """Queue a request (from an event loop); its outputs arrive on the returned queue."""
        out: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), out)
        self._inbox.put((request_id, prompt_ids, max_tokens, ignore_eos, sampling))
        return out

    def _admit(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
            while True:
                request_id, prompt_ids, max_tokens, ignore_eos, sampling = item
                self.engine.add_request(request_id, prompt_ids, max_tokens, ignore_eos, sampling=sampling)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._admit(block=not self.engine.has_unfinished())
            if not self.engine.has_unfinished():
                continue
            outputs = self.engine.step()
            self.steps += 1
            self.stats = self.engine.stats()
            for output in outputs:
                target = self._streams.get(output.request_id)
                if target is None:
                    continue
                if output.finished:
                    del self._streams[output.request_id]
                loop, out = target
                loop.call_soon_threadsafe(out.put_nowait, output)

    def close(self) -> None:
        """Stop stepping."""
        self._stop.set()
        self._thread.join(timeout=10)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _error_body(status: int, message: str) -> dict:
    kind = "BadRequestError" if status < 500 else "InternalServerError"
    return {"error": {"message": message, "type": kind, "code": status}}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content=_error_body(status, message))


def prometheus_text(model_name: str, stats: Any, num_blocks: int, block_size: int, max_num_seqs: int) -> str:
    """Engine state in Prometheus text format, under vLLM's metric names (+ ``orch:`` byte counters)."""
    labels = f'engine="0",model_name="{model_name}"'
    usage = stats.kv_blocks_used / num_blocks if num_blocks else 0.0
    lines = [
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{labels}}} {float(stats.running)}",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{labels}}} {float(stats.waiting)}",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{labels}}} {usage}",
        "# TYPE vllm:num_preemptions_total counter",
        f"vllm:num_preemptions_total{{{labels}}} {float(stats.preemptions)}",
        "# TYPE vllm:cache_config_info gauge",
        f'vllm:cache_config_info{{block_size="{block_size}",num_gpu_blocks="{num_blocks}",'
        f'max_num_seqs="{max_num_seqs}",{labels}}} 1.0',
        "# TYPE orch:kv_bytes_device gauge",
        f"orch:kv_bytes_device{{{labels}}} {float(stats.kv_bytes_device)}",
        "# TYPE orch:kv_bytes_host gauge",
        f"orch:kv_bytes_host{{{labels}}} {float(stats.kv_bytes_host)}",
        "# TYPE orch:h2d_bytes_total counter",
        f"orch:h2d_bytes_total{{{labels}}} {float(stats.h2d_bytes)}",
    ]
    return "\n".join(lines) + "\n"


def _finish_reason(generated: int, max_tokens: int) -> str:
    return "length" if generated >= max_tokens else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _synthetic_tokenizer(engine: Any, config: EngineConfig) -> Any:
    """Dummy weights have no tokenizer: use the same word-level one the vLLM adapter generates."""
    from transformers import AutoTokenizer

    from backends.kvcache.loader import resolve
    from backends.kvcache.vllm.model_folder import dummy_folder

    hf_config, _ = resolve(config)
    folder = dummy_folder(hf_config, config.dtype)
    return AutoTokenizer.from_pretrained(str(folder.path))


# Serve pickles the deployment class when it is decorated: everything it calls is defined above.
app = FastAPI(title="orch engine", docs_url=None, redoc_url=None)


@serve.deployment(num_replicas=1, max_ongoing_requests=4096)
@serve.ingress(app)
class EngineServer:
    """One engine replica behind OpenAI-compatible routes."""

    def __init__(self, config: dict, model_name: str, torch_threads: int | None = None):
        import torch

        from backends.kvcache.engine import LLMEngine

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.config = EngineConfig(**config)
        self.model_name = model_name
        engine = LLMEngine(self.config)
        self.tokenizer = engine.tokenizer or _synthetic_tokenizer(engine, self.config)
        self.max_model_len = engine.max_model_len
        self.num_blocks = engine.block_manager.num_blocks
        self.loop = EngineLoop(engine)
        self._ids = itertools.count()

    @app.get("/health")
    def health(self) -> PlainTextResponse:
        return PlainTextResponse("")

    @app.get("/v1/models")
    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "orch",
            "max_model_len": self.max_model_len,
        }]}

    @app.get("/metrics")
    def metrics(self) -> PlainTextResponse:
        text = prometheus_text(self.model_name, self.loop.stats, self.num_blocks, self.config.block_size,
                               self.config.max_num_seqs)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/engine_stats")
    def engine_stats(self) -> dict:
        return {**asdict(self.loop.stats), "steps": self.loop.steps}

    # The engine's own memory peaks (in-step ones included, which a /metrics scrape between
    # steps misses), so a trial over HTTP reports the same memory figures as one in process.
    @app.post("/v1/engine_peaks/reset")
    def reset_peaks(self) -> dict:
        self.loop.engine.reset_peaks()
        return {}

    @app.get("/v1/engine_peaks")
    def peaks(self) -> dict:
        engine = self.loop.engine
        return {"peak_kv_bytes": int(engine.peak_kv_bytes()), "peak_device_bytes": int(engine.peak_device_bytes())}

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        return prompt

    def _chat_ids(self, req: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.model_name!r} has no chat template; use /v1/completions")
        text = self.tokenizer.apply_chat_template(req.conversation(), add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    async def _start(self, prompt_ids: list[int], max_tokens: int, req: Any, prefix: str):
        """Submit to the engine; returns (request id, first output, queue) or an error response."""
        if req.model not in (None, self.model_name):
            return _error(404, f"model {req.model!r} does not exist; this server has {self.model_name!r}")
        request_id = f"{prefix}-{uuid.uuid4().hex[:16]}-{next(self._ids)}"
        outputs = self.loop.submit(request_id, prompt_ids, max_tokens, req.ignore_eos, req.sampling())
        first = await outputs.get()
        if first.error:
            return _error(400, first.error)
        return request_id, first, outputs

    @staticmethod
    async def _all_tokens(first: Any, outputs: asyncio.Queue) -> list[int] | JSONResponse:
        """Every token of a request, or the error response of a request the engine failed."""
        token_ids, output = list(first.new_token_ids), first
        while not output.finished:
            output = await outputs.get()
            token_ids += output.new_token_ids
        return _error(500, output.error) if output.error else token_ids

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            req = parse_request(CompletionRequest, await request.json())
            prompt_ids = self._prompt_ids(req.prompt_one())
        except ValueError as exc:
            return _error(400, str(exc))
        max_tokens = req.max_tokens or 16  # OpenAI's default for completions
        started = await self._start(prompt_ids, max_tokens, req, "cmpl")
        if isinstance(started, JSONResponse):
            return started
        request_id, first, outputs = started
        if req.stream:
            return StreamingResponse(
                self._stream(request_id, first, outputs, len(prompt_ids), max_tokens, req.include_usage, chat=False),
                media_type="text/event-stream",
            )
        token_ids = await self._all_tokens(first, outputs)
        if isinstance(token_ids, JSONResponse):
            return token_ids
        return {
            "id": request_id, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
            "choices": [{"index": 0, "text": self.tokenizer.decode(token_ids), "token_ids": token_ids,
                         "finish_reason": _finish_reason(len(token_ids), max_tokens), "logprobs": None}],
            "usage": _usage(len(prompt_ids), len(token_ids)),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        try:
            req = parse_request(ChatCompletionRequest, await request.json())
            prompt_ids = self._chat_ids(req)
        except ValueError as exc:
            return _error(400, str(exc))
        max_tokens = req.max_new_tokens() or max(1, self.max_model_len - len(prompt_ids))
        started = await self._start(prompt_ids, max_tokens, req, "chatcmpl")
        if isinstance(started, JSONResponse):
            return started
        request_id, first, outputs = started
        if req.stream:
            return StreamingResponse(
                self._stream(request_id, first, outputs, len(prompt_ids), max_tokens, req.include_usage, chat=True),
                media_type="text/event-stream",
            )
        token_ids = await self._all_tokens(first, outputs)
        if isinstance(token_ids, JSONResponse):
            return token_ids
        return {
            "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
            "choices": [{"index": 0, "finish_reason": _finish_reason(len(token_ids), max_tokens), "logprobs": None,
                         "message": {"role": "assistant",
                                     "content": self.tokenizer.decode(token_ids, skip_special_tokens=True)}}],
            "usage": _usage(len(prompt_ids), len(token_ids)),
        }

    async def _stream(self, request_id: str, first: Any, outputs: asyncio.Queue, prompt_len: int,
                      max_tokens: int, include_usage: bool, chat: bool):
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": request_id, "object": kind, "created": created, "model": self.model_name}
        text = TextStream(self.tokenizer, skip_special_tokens=chat)
        generated = 0
        output = first
        if chat:  # the role comes first, alone, as OpenAI's API sends it
            yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        while True:
            if output.new_token_ids:
                generated += len(output.new_token_ids)
                reason = _finish_reason(generated, max_tokens) if output.finished else None
                piece = text.add(list(output.new_token_ids), final=output.finished)
                choice: dict[str, Any] = {"index": 0, "token_ids": list(output.new_token_ids), "logprobs": None,
                                          "finish_reason": reason}
                choice.update({"delta": {"content": piece}} if chat else {"text": piece})
                yield _sse({**head, "choices": [choice]})
            if output.error:
                # Failed mid-stream (e.g. no longer fits the KV budget): an error event, as
                # vLLM's server sends, so a client counts the request failed, not short.
                yield _sse(_error_body(500, output.error))
                yield "data: [DONE]\n\n"
                return
            if output.finished:
                break
            output = await outputs.get()
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_len, generated)})
        yield "data: [DONE]\n\n"


def build_app(config: EngineConfig, name: str = "orch", num_cpus: float = 0.0,
              torch_threads: int | None = None, actor_options: dict | None = None) -> serve.Application:
    """The Serve application for one engine configuration (not yet running); ``actor_options``
    are more Ray actor options for its replica (placement, environment)."""
    options = {"num_cpus": num_cpus, **(actor_options or {})}
    return EngineServer.options(ray_actor_options=options).bind(asdict(config), name, torch_threads)


def _start_serve(host: str, port: int, attempts: int = 5) -> Any:
    """Serve's client, starting Serve if needed. Trials that start at the same moment race to
    create its controller; the loser finds it there on the next attempt."""
    from ray.exceptions import ActorAlreadyExistsError
    from ray.serve._private.api import serve_start  # public serve.start() does not say the proxy's address

    for attempt in range(attempts):
        try:
            return serve_start(http_options={"host": host, "port": port})
        except ActorAlreadyExistsError:
            if attempt == attempts - 1:
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def deploy(config: EngineConfig, host: str = "127.0.0.1", port: int = 8000, name: str = "orch",
           num_cpus: float = 0.0, torch_threads: int | None = None, route_prefix: str = "/",
           actor_options: dict | None = None) -> str:
    """Run the engine as Serve application ``name`` under ``route_prefix``; returns its base URL.

    Starts a local Ray (loopback only) when none is connected. The served model name is ``name``.
    Serve has one HTTP proxy per cluster: when Serve already runs, ``host``/``port`` are those it
    was started with (the URL returned says which), so applications deployed side by side (the
    trials of a grid) each need their own ``name`` and ``route_prefix``.
    """
    import os

    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # address="local": always a new cluster, never one that another process on this host started.
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    proxy = _start_serve(host, port).http_config
    serve.run(build_app(config, name, num_cpus, torch_threads, actor_options), name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{proxy.host}:{proxy.port}{route_prefix.rstrip('/')}"


def undeploy(name: str = "orch") -> None:
    """Delete Serve application ``name`` (its replica and engine)."""
    serve.delete(name)
