"""The engine on its GPU path (Triton paged decode, fused RMSNorm/RoPE, CUDA graphs on a GPU)
produces transformers' greedy tokens and the reference path's scores and evictions. Without
a GPU the same path runs in Triton's interpreter (no graphs)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported: it reads the choice once
    os.environ["TRITON_INTERPRET"] = "1"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

from backends.kvcache import EngineConfig, LLMEngine  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LENS = (5, 21)


@pytest.fixture(scope="module", params=["llama", "opt"])
def random_hf_folder(request, tmp_path_factory):
    """A small random Llama (GQA) or OPT in transformers, saved as a HF folder; weights large
    enough that greedy tokens vary."""
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    if request.param == "llama":
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          initializer_range=0.25, tie_word_embeddings=False)
    else:
        cfg = OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256, init_std=0.25, word_embed_proj_dim=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return folder, model


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in LENS]


def engine(folder, backend: str, policy: str = "full", async_scheduling: bool | None = None,
           kv_cache_blocks: int | None = None, **params) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(folder), weights="real", device=DEVICE, attention_backend=backend,
                                  policy=policy, policy_params=params, max_num_seqs=4, max_model_len=96,
                                  block_size=4, async_scheduling=async_scheduling, kv_cache_blocks=kv_cache_blocks))


def test_greedy_tokens_equal_transformers(random_hf_folder):
    from transformers import GenerationConfig

    folder, hf = random_hf_folder
    ps = prompts(256)
    eng = engine(folder, "triton")
    assert eng.attention_backend == "triton" and eng.runner.paged
    assert (eng.runner.graphs is not None) == (DEVICE == "cuda")
    got = eng.generate(ps, 8)
    hf = hf.to(DEVICE)
    gen = GenerationConfig(max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = []
    with torch.inference_mode():
        for p in ps:
            ids = torch.tensor([p], device=DEVICE)
            want.append(hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)[0, len(p):].tolist())
    assert len({tuple(w) for w in want}) > 1 and len(set(want[0])) > 2  # the outputs are not degenerate
    assert got == want


def test_h2o_scores_and_evictions_equal_the_reference_path(random_hf_folder):
    folder, _ = random_hf_folder
    ps = prompts(256)
    runs = {}
    for backend in ("torch", "triton"):
        eng = engine(folder, backend, "h2o", heavy_ratio=0.25, recent_ratio=0.25)
        assert eng.runner.paged == (backend == "triton")  # scores from the paged kernel itself
        for i, p in enumerate(ps):
            eng.add_request(str(i), p, 10)
        for _ in range(4):
            eng.step()
        runs[backend] = [eng.kept_positions(str(i)) for i in range(len(ps))]
    for a, b in zip(runs["torch"], runs["triton"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("policy,params", [("h2o", {"kv_budget": 0.4}), ("streaming", {"kv_budget": 0.4, "sink_tokens": 2})])
def test_drop_in_place_kernel_keeps_what_the_reference_keeps(random_hf_folder, policy, params):
    folder, _ = random_hf_folder
    ps = prompts(256)
    kept, dropped = {}, 0
    for backend in ("torch", "triton"):
        eng = engine(folder, backend, policy, **params)
        for i, p in enumerate(ps):
            eng.add_request(str(i), p, 12)
        for _ in range(7):
            eng.step()
            dropped += len(eng.runner.dropped)
        kept[backend] = [[[sorted(eng.kept_positions(str(i))[layer, :, h].tolist()) for h in range(2)]
                          for layer in range(2)] for i in range(len(ps))]
    assert dropped > 0  # the kernel did the steady-state drops
    assert kept["torch"] == kept["triton"]


@pytest.mark.parametrize("policy", ["h2o", "offload", "infinigen"])
def test_async_steps_feed_the_paged_buffers(random_hf_folder, policy):
    """Steps launched before the last one's tokens are read back take their input tokens from
    the device (into the persistent decode buffers): the same tokens as synchronous steps, with
    h2o's in-place drops, and with the host stores (whose prompts' staged K/V land before a
    step runs ahead); test_async_scheduling.py covers every policy on the reference path."""
    folder, _ = random_hf_folder
    ps = prompts(256)
    params = {} if policy == "offload" else {"kv_budget": 0.4}
    sync = engine(folder, "triton", policy, async_scheduling=False, **params).generate(ps, 10)
    eng = engine(folder, "triton", policy, async_scheduling=True, **params)
    assert eng.generate(ps, 10) == sync


def test_lossless_infinigen_equals_full(random_hf_folder):
    """infinigen keeping everything (alpha beyond any score gap, budget 1) gives full's tokens; on
    a GPU its every layer reads the pinned store in place on the side stream."""
    folder, _ = random_hf_folder
    ps = prompts(256)
    full = engine(folder, "triton").generate(ps, 6)
    eng = engine(folder, "triton", "infinigen", alpha=1e9, kv_budget=1.0)
    assert eng.policy.uva == (DEVICE == "cuda")
    assert eng.generate(ps, 6) == full


def test_offload_over_prefetched_buffers_equals_full(random_hf_folder):
    """offload decodes through the paged kernel over its layer-ahead copies of the host store
    (kernels copying the pages the block tables hold, and writing the new K/V into the store)."""
    folder, _ = random_hf_folder
    ps = prompts(256)
    full = engine(folder, "triton").generate(ps, 6)
    eng = engine(folder, "triton", "offload", kv_cache_blocks=32)  # (reserved: no growth, one capture)
    assert eng.runner.paged and eng.policy.mapped
    assert (eng.runner.graphs is not None) == (DEVICE == "cuda")
    assert eng.generate(ps, 6) == full
    per_token = eng.model_config.kv_bytes_per_token
    assert eng.stats().d2h_bytes == (sum(LENS) + 2 * 5) * per_token  # prompts + 5 decoded tokens each
    # each of the 5 decode steps copied, per layer, the pages (of 4 entries) each sequence holds;
    # on a GPU the captured graph's eager warm-up also copied one page per (padding) row
    pages = sum(-(-(n + i + 1) // 4) for n in LENS for i in range(5))
    pages += sum(eng.runner.graphs.captured) if eng.runner.graphs is not None else 0
    assert eng.stats().h2d_bytes == pages * 4 * per_token


@pytest.fixture(scope="module")
def deep_llama_folder(tmp_path_factory):
    """A random 4-layer Llama: infinigen speculates from layer 2 on, so two layers select."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.25, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("llama4")
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("params", [{"kv_budget": 0.3}, {"kv_budget": 0.5, "alpha": 0.5}])
def test_infinigen_paged_decode_equals_the_reference_path(deep_llama_folder, params):
    """infinigen's decode on the paged path (what a GPU captures in CUDA graphs: fixed-width
    selections on the device, the host store written and read in place by kernels) gives the
    reference path's tokens, with selections that change the output against full."""
    gen = torch.Generator().manual_seed(1)
    ps = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (5, 21, 40, 13)]  # (a graph bucket)
    tokens = 6  # 5 decode steps: every sequence crosses a page of 4 entries (the CPU runs the kernels interpreted)
    full = engine(deep_llama_folder, "torch").generate(ps, tokens)
    ref = engine(deep_llama_folder, "torch", "infinigen", **params)
    paged = engine(deep_llama_folder, "triton", "infinigen", **params)
    assert paged.runner.paged and not ref.runner.paged
    assert (paged.runner.graphs is not None) == (DEVICE == "cuda")
    want = ref.generate(ps, tokens)
    assert want != full  # the selections dropped entries that mattered
    assert paged.generate(ps, tokens) == want
    # every new entry of every layer was written to the host store: prompts + the decode steps
    assert paged.stats().d2h_bytes == ref.stats().d2h_bytes == (sum(len(p) for p in ps) + 4 * (tokens - 1)) * (
        paged.model_config.kv_bytes_per_token)
