"""The served API as clients expect it: the official ``openai`` client against our engine under
Ray Serve on 127.0.0.1 (SmolLM2-135M-Instruct, real weights, its chat template): chat
completions streamed and not, sampling honoured and seeded, unsupported parameters refused."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import openai  # a test extra (pyproject.toml)
import pytest
import torch
from fastapi.responses import JSONResponse

from backends.kvcache.engine import StepOutput
from backends.kvcache.openai_api import ChatCompletionRequest, CompletionRequest, parse_request
from backends.kvcache.sampling import SamplingParams, sample
from backends.kvcache.serve import EngineServer

APP = "orch"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize("model, body, message", [
    (CompletionRequest, {"prompt": "x", "n": 2}, "parameter 'n' is not supported by this server (got 2)"),
    (CompletionRequest, {"prompt": "x", "logprobs": 3}, "parameter 'logprobs' is not supported"),
    (CompletionRequest, {"prompt": "x", "foo": 1}, "parameter 'foo' is not supported by this server"),
    (CompletionRequest, {"prompt": "x", "temperature": 3}, "parameter 'temperature': Input should be less than"),
    (ChatCompletionRequest, {"messages": QUESTION, "tools": [{"type": "function"}]}, "parameter 'tools'"),
    (ChatCompletionRequest, {"messages": []}, "parameter 'messages'"),
])
def test_unsupported_parameters_are_named(model, body, message) -> None:
    with pytest.raises(ValueError) as err:
        parse_request(model, body)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_neutral_values_that_clients_send_are_accepted() -> None:
    # what `vllm bench serve` sends
    req = parse_request(CompletionRequest, {"prompt": [1, 2], "logprobs": None, "repetition_penalty": 1.0, "n": 1})
    assert req.prompt_one() == [1, 2] and req.sampling().temperature == 1.0  # OpenAI's default


def test_sampling_is_seeded_and_top_p_truncates() -> None:
    logits = torch.tensor([2.0, 1.9, 1.8, -5.0])
    draws = [[sample(logits, params) for _ in range(50)]
             for params in (SamplingParams(1.0, 1.0, seed=3), SamplingParams(1.0, 1.0, seed=3))]
    assert draws[0] == draws[1] and len(set(draws[0])) >= 2  # reproducible, and not greedy
    nucleus = SamplingParams(1.0, top_p=0.3, seed=3)  # the top token alone holds > 0.3 of the mass
    assert {sample(logits, nucleus) for _ in range(50)} == {0}
    assert sample(logits, SamplingParams(0.0)) == 0


class _DigitTokenizer:
    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(str(t) for t in token_ids)


def _served(outputs: list[StepOutput], stream: bool) -> list[str] | JSONResponse:
    """What the Serve app answers for a request whose engine outputs are ``outputs``."""
    server = SimpleNamespace(model_name="m", tokenizer=_DigitTokenizer())
    cls = EngineServer.func_or_class

    async def answer():
        queue: asyncio.Queue = asyncio.Queue()
        for output in outputs[1:]:
            queue.put_nowait(output)
        if not stream:
            return await cls._all_tokens(outputs[0], queue)
        return [event async for event in cls._stream(server, "r", outputs[0], queue, 4, 8, True, chat=False)]

    return asyncio.run(answer())


def test_an_engine_error_after_tokens_is_an_error_not_a_short_answer() -> None:
    # e.g. a preempted request that no longer fits the KV budget: a client must count it failed
    outputs = [StepOutput("r", [1], False), StepOutput("r", [2], False),
               StepOutput("r", [], True, "cannot fit in the KV budget after preemption")]
    events = _served(outputs, stream=True)
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert [p["choices"][0]["token_ids"] for p in payloads[:2]] == [[1], [2]]
    assert payloads[2] == {"error": {"message": "cannot fit in the KV budget after preemption",
                                     "type": "InternalServerError", "code": 500}}
    assert events[-1] == "data: [DONE]\n\n" and len(events) == 4  # no usage chunk after the error
    answer = _served(outputs, stream=False)
    assert answer.status_code == 500 and b"cannot fit in the KV budget" in answer.body
    assert _served(outputs[:1] + [StepOutput("r", [2], True)], stream=False) == [1, 2]


@pytest.fixture(scope="module")
def client():
    import ray
    from ray import serve

    from backends.kvcache.config import EngineConfig
    from backends.kvcache.serve import deploy
    from backends.network.ports import free_port

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        config = EngineConfig(model="smollm2-135m", weights="real", max_num_seqs=4, max_model_len=512)
        url = deploy(config, port=free_port(), name=APP, torch_threads=1)
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_chat_completion_streamed_and_not(client, smol_tokenizer) -> None:
    whole = client.chat.completions.create(model=APP, messages=QUESTION, max_tokens=12, temperature=0)
    (choice,) = whole.choices
    template_ids = smol_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert whole.usage.prompt_tokens == len(smol_tokenizer.encode(template_ids, add_special_tokens=False))
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert "<|im_end|>" not in choice.message.content
    stream = client.chat.completions.create(model=APP, messages=QUESTION, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


@pytest.mark.slow
def test_sampling_is_honoured_and_seeded(client) -> None:
    def text(**kw) -> str:
        out = client.completions.create(model=APP, prompt="In the beginning God created", max_tokens=16, **kw)
        return out.choices[0].text

    greedy = text(temperature=0)
    assert text(temperature=0) == greedy
    first, again = text(temperature=1.5, top_p=0.95, seed=11), text(temperature=1.5, top_p=0.95, seed=11)
    assert first == again  # a seed makes sampling reproducible
    assert {first, text(temperature=1.5, top_p=0.95, seed=12), text(temperature=1.5, seed=13)} - {greedy}


@pytest.mark.slow
def test_unsupported_parameters_get_a_400_naming_them(client) -> None:
    cases = [
        (dict(n=2), "'n'"),
        (dict(logprobs=True), "'logprobs'"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "'tools'"),
        (dict(extra_body={"frobnicate": 1}), "'frobnicate'"),
    ]
    for kwargs, name in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=APP, messages=QUESTION, max_tokens=2, **kwargs)
        assert err.value.status_code == 400 and name in err.value.message
