"""A tiny OpenAI-style streaming completions server (stdlib only) for testing the HTTP client.

Each request streams ``max_tokens`` tokens, ``tokens_per_chunk`` per chunk, one chunk every
``chunk_delay_s`` after a first-token delay; a prompt starting with token id 666 gets HTTP 400.
It counts requests in flight so tests can check the client's concurrency cap, and serves a fixed
Prometheus text on ``/metrics``.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

METRICS_TEXT = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="fake"} 3.0
vllm:num_requests_waiting{engine="0",model_name="fake"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="fake"} 0.25
vllm:num_preemptions_total{engine="0",model_name="fake"} 7.0
vllm:cache_config_info{block_size="32",cache_dtype="auto",num_gpu_blocks="400",num_cpu_blocks="None"} 1.0
"""


class FakeOpenAI:
    """Run with ``with FakeOpenAI() as fake: fake.url ...``."""

    def __init__(self, first_delay_s: float = 0.05, chunk_delay_s: float = 0.01, tokens_per_chunk: int = 1):
        self.first_delay_s = first_delay_s
        self.chunk_delay_s = chunk_delay_s
        self.tokens_per_chunk = tokens_per_chunk
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:
                body = METRICS_TEXT.encode() if self.path == "/metrics" else b""
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.bodies.append(body)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                self.counted = True
                try:
                    self._complete(body)
                finally:
                    self._uncount()

            def _uncount(self) -> None:
                # Before the answer's last bytes: a client that read them may send its next
                # request at once, which must not find this one still counted in flight.
                with fake._lock:
                    if self.counted:
                        fake.in_flight -= 1
                        self.counted = False

            def _complete(self, body: dict) -> None:
                prompt = body["prompt"]
                if prompt and prompt[0] == 666:
                    message = b'{"error": {"message": "bad prompt"}}'
                    self.send_response(400)
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                time.sleep(fake.first_delay_s)
                sent = 0
                while sent < body["max_tokens"]:
                    ids = list(range(sent, min(sent + fake.tokens_per_chunk, body["max_tokens"])))
                    sent += len(ids)
                    chunk = {"choices": [{"index": 0, "text": "x" * len(ids), "token_ids": ids}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    if sent < body["max_tokens"]:
                        time.sleep(fake.chunk_delay_s)
                usage = {"prompt_tokens": len(prompt), "completion_tokens": sent, "total_tokens": len(prompt) + sent}
                self._uncount()
                self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

        return Handler
