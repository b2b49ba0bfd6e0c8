"""On a GPU, with real weights: the engine's GPU path (Triton paged decode attention, fused
RMSNorm/RoPE, decode replayed from CUDA graphs) produces transformers' greedy tokens on
SmolLM2-135M-Instruct in float32, transformers running on the same GPU. Skipped only where there
is no CUDA device (on CPU, test_full_vs_hf.py checks the reference path the same way)."""

from __future__ import annotations

import pytest
import torch

from backends.kvcache import EngineConfig, LLMEngine
from tests.kvcache.conftest import SMOL, TEXTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MORE_TEXTS = [
    "The three primary colors are",
    "In 1969, the first humans to walk on the Moon were",
    "To make a cup of tea, first",
    "import numpy as np\n\ndef softmax(x):",
]
NEW_TOKENS_GPU = 32


def test_real_weights_greedy_tokens_equal_transformers_on_gpu(smol_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    prompts = [tok(t)["input_ids"] for t in TEXTS + MORE_TEXTS]
    hf = AutoModelForCausalLM.from_pretrained(str(smol_dir), dtype=torch.float32).cuda().eval()
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS_GPU, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = []
    with torch.inference_mode():
        for p in prompts:  # one prompt at a time: no padding in the reference
            ids = torch.tensor([p], device="cuda")
            want.append(hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)[0, len(p):].tolist())
    del hf

    engine = LLMEngine(EngineConfig(model=SMOL, weights="real", device="cuda", dtype="float32", max_num_seqs=8,
                                    cuda_graphs=True))
    assert engine.attention_backend == "triton" and engine.runner.paged and engine.runner.graphs is not None
    got = engine.generate(prompts, NEW_TOKENS_GPU, ignore_eos=False)  # both stop at EOS
    assert engine.runner.graphs.captured, "decode never replayed a CUDA graph"
    assert got == want
