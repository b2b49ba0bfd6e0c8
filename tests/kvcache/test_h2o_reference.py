"""h2o at budget 0.2 keeps exactly the heavy hitters a plain computation from the definition
selects, and evicted entries really give their blocks back."""

from __future__ import annotations

import math

import torch

from tests.kvcache.conftest import TEXTS

HEAVY, RECENT = 0.1, 0.1


def reference_keep(attentions, n, num_kv_heads):
    """From HF's attention probabilities over the prompt: per layer and KV head, the set of
    positions kept = the floor(0.1 n) most recent + the floor(0.2 n) - that many others with
    the largest column sum (over every query and the query heads sharing the KV head)."""
    total = math.floor((HEAVY + RECENT) * n + 1e-9)
    recent = max(1, math.floor(RECENT * n + 1e-9))
    kept = []
    for probs in attentions:  # [1, H, n, n]
        heads = probs[0].shape[0]
        group = heads // num_kv_heads
        per_layer = []
        for g in range(num_kv_heads):
            col = probs[0, g * group : (g + 1) * group].double().sum(dim=(0, 1))  # [n]
            recent_pos = set(range(n - recent, n))
            others = sorted((p for p in range(n) if p not in recent_pos), key=lambda p: -float(col[p]))
            per_layer.append(recent_pos | set(others[: total - recent]))
        kept.append(per_layer)
    return kept


def test_h2o_prefill_keeps_reference_heavy_hitters(smol_engine_factory, smol_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    prompt = tok(" ".join(TEXTS))["input_ids"]
    n = len(prompt)
    engine = smol_engine_factory("h2o", policy_params={"heavy_ratio": HEAVY, "recent_ratio": RECENT})
    engine.add_request("r", prompt, max_tokens=6)
    engine.step()  # prefill, then eviction down to the budget
    got = engine.kept_positions("r")  # [L, kept, KVH]
    cfg = engine.model_config

    hf = AutoModelForCausalLM.from_pretrained(str(smol_dir), dtype=torch.float32, attn_implementation="eager")
    with torch.inference_mode():
        attentions = hf(torch.tensor([prompt]), output_attentions=True).attentions
    want = reference_keep(attentions, n, cfg.num_kv_heads)

    assert got.shape == (cfg.num_layers, math.floor(0.2 * n), cfg.num_kv_heads)
    for layer in range(cfg.num_layers):
        for head in range(cfg.num_kv_heads):
            assert set(got[layer, :, head].tolist()) == want[layer][head], (layer, head)
    # heads really differ (per-head selection), and memory follows the kept count
    assert any(set(got[1, :, 0].tolist()) != set(got[1, :, h].tolist()) for h in range(1, cfg.num_kv_heads))
    bs = engine.config.block_size
    assert engine.stats().kv_blocks_used == -(-math.floor(0.2 * n) // bs)
    assert engine.stats().kv_bytes_device == math.floor(0.2 * n) * cfg.kv_bytes_per_token

    while engine.has_unfinished():  # decoding keeps exactly the budget of the tokens seen
        engine.step()
        if engine.has_unfinished():
            seen = n + len(engine._seqs["r"].output_token_ids) - 1
            kept = min(seen, math.floor(0.2 * seen + 1e-9))
            assert engine.kept_positions("r").shape[1] == kept
            assert engine.stats().kv_bytes_device == kept * cfg.kv_bytes_per_token
    assert engine.stats().kv_blocks_used == 0
