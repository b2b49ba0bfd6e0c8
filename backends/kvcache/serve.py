"""Our engine as a Ray Serve application speaking OpenAI-compatible streaming ``/v1/completions``.

One replica owns one ``LLMEngine``. The engine is stepped by a background thread
(``EngineLoop``): HTTP handlers put new requests in an inbox, the thread admits them at step
boundaries, steps the engine, and pushes each request's new tokens to that request's asyncio
queue, from which the handler streams server-sent events in the same format as vLLM's server
(one chunk per token, ``token_ids`` included, a final ``usage`` chunk when
``stream_options.include_usage`` is set). So the same client measures vLLM and our engine.

Routes: ``POST /v1/completions`` (streaming or not; prompt as text or token ids; greedy),
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

    def submit(self, request_id: str, prompt_ids: list[int], max_tokens: int, ignore_eos: bool) -> asyncio.Queue:
        """Queue a request (from an event loop); its outputs arrive on the returned queue."""
        out: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), out)
        self._inbox.put((request_id, prompt_ids, max_tokens, ignore_eos))
        return out

    def _admit(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
            while True:
                self.engine.add_request(*item)
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


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "BadRequestError",
                                                               "code": status}})


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

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return prompt
        raise ValueError("prompt must be a string or a list of token ids (one prompt per request)")

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            body = await request.json()
            prompt_ids = self._prompt_ids(body.get("prompt"))
            max_tokens = int(body.get("max_tokens") or 16)
            if int(body.get("n") or 1) != 1:
                raise ValueError("only n=1 is supported")
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc))
        if body.get("model") not in (None, self.model_name):
            return _error(404, f"model {body.get('model')!r} does not exist; this server has {self.model_name!r}")
        request_id = f"cmpl-{uuid.uuid4().hex[:16]}-{next(self._ids)}"
        outputs = self.loop.submit(request_id, prompt_ids, max_tokens, bool(body.get("ignore_eos", False)))
        first = await outputs.get()
        if first.error:
            return _error(400, first.error)
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        if stream:
            return StreamingResponse(
                self._stream(request_id, first, outputs, len(prompt_ids), max_tokens, include_usage),
                media_type="text/event-stream",
            )
        token_ids = list(first.new_token_ids)
        output = first
        while not output.finished:
            output = await outputs.get()
            token_ids += output.new_token_ids
        return {
            "id": request_id, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
            "choices": [{"index": 0, "text": self.tokenizer.decode(token_ids), "token_ids": token_ids,
                         "finish_reason": _finish_reason(len(token_ids), max_tokens), "logprobs": None}],
            "usage": _usage(len(prompt_ids), len(token_ids)),
        }

    async def _stream(self, request_id: str, first: Any, outputs: asyncio.Queue, prompt_len: int,
                      max_tokens: int, include_usage: bool):
        created = int(time.time())
        generated = 0
        output = first
        while True:
            if output.new_token_ids:
                generated += len(output.new_token_ids)
                reason = _finish_reason(generated, max_tokens) if output.finished else None
                yield _sse({
                    "id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": [{"index": 0, "text": self.tokenizer.decode(output.new_token_ids),
                                 "token_ids": list(output.new_token_ids), "logprobs": None,
                                 "finish_reason": reason}],
                })
            if output.finished:
                break
            output = await outputs.get()
        if include_usage:
            yield _sse({"id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
                        "choices": [], "usage": _usage(prompt_len, generated)})
        yield "data: [DONE]\n\n"


def build_app(config: EngineConfig, name: str = "orch", num_cpus: float = 0.0,
              torch_threads: int | None = None) -> serve.Application:
    """The Serve application for one engine configuration (not yet running)."""
    options = {"num_cpus": num_cpus}
    return EngineServer.options(ray_actor_options=options).bind(asdict(config), name, torch_threads)


def deploy(config: EngineConfig, host: str = "127.0.0.1", port: int = 8000, name: str = "orch",
           num_cpus: float = 0.0, torch_threads: int | None = None) -> str:
    """Run the engine as Serve application ``name`` on http://host:port; returns that base URL.

    Starts a local Ray (loopback only) when none is connected. The served model name is ``name``.
    Serve has one HTTP proxy per cluster: a second ``deploy`` shares the first one's host and port,
    so give each application its own ``name`` (its routes live under ``/`` only for the first).
    """
    import os

    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # address="local": always a new cluster, never one that another process on this host started.
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config, name, num_cpus, torch_threads), name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def undeploy(name: str = "orch") -> None:
    """Delete Serve application ``name`` (its replica and engine)."""
    serve.delete(name)
