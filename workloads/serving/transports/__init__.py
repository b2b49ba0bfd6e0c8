"""How the load reaches a system under test: request specs and records (``base.py``), the shared
open-loop core of the asyncio transports (``open_loop.py``), HTTP (``http.py``, with engine-side
samples from ``/metrics``: ``prometheus.py``), our engine in process (``engine_inprocess.py``)
and vLLM in process (``vllm_inprocess.py``)."""
