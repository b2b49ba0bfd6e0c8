"""The open-loop load: arrival processes, length distributions, traces, prompts from the corpus,
and the generator that turns ``load.*`` parameters into a schedule of requests."""

from workloads.serving.load.generator import DEFAULT_NUM_REQUESTS, build_load

__all__ = ["DEFAULT_NUM_REQUESTS", "build_load"]
