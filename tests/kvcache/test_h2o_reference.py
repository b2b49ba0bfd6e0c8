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


def _plain_h2o_decode(engine, prompt: list[int], steps: int):
    """The definition, token by token on the engine's own tiny-llama weights: each layer and
    KV head keeps a set of positions; a new token attends (per query head) to the kept set of
    its KV head, adds its probabilities to those positions' scores, and after each step (the
    prompt counts as one) the sets shrink to the recent window + the top scorers."""
    m, cfg = engine.model, engine.model_config
    kvh, d = cfg.num_kv_heads, cfg.head_dim
    group = cfg.num_heads // kvh
    L = cfg.num_layers
    keys = [dict() for _ in range(L)]
    values = [dict() for _ in range(L)]
    kept = [[set() for _ in range(kvh)] for _ in range(L)]
    score = [[dict() for _ in range(kvh)] for _ in range(L)]

    def rope(x, pos):
        freqs = pos * m.inv_freq.float()
        cos, sin = torch.cat([freqs, freqs]).cos(), torch.cat([freqs, freqs]).sin()
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def feed(token, pos):
        h = m.embed_tokens.weight[token]
        for li, layer in enumerate(m.layers):
            x = layer.input_layernorm(h)
            q, k, v = layer.self_attn.qkv_proj(x).split([cfg.num_heads * d, kvh * d, kvh * d])
            q, k, v = rope(q.view(-1, d), pos), rope(k.view(kvh, d), pos), v.view(kvh, d)
            keys[li][pos], values[li][pos] = k, v
            out = []
            for head in range(cfg.num_heads):
                g = head // group
                kept[li][g].add(pos)
                order = sorted(kept[li][g])
                kk = torch.stack([keys[li][p][g] for p in order])
                vv = torch.stack([values[li][p][g] for p in order])
                probs = torch.softmax((kk @ q[head]) * d**-0.5, dim=0)
                for p, pr in zip(order, probs.tolist(), strict=True):
                    score[li][g][p] = score[li][g].get(p, 0.0) + pr
                out.append(probs @ vv)
            h = h + layer.self_attn.o_proj(torch.cat(out))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return int(m.logits(m.norm(h)[None]).argmax())

    def evict(n):
        total = math.floor((HEAVY + RECENT) * n + 1e-9)
        recent = max(1, math.floor(RECENT * n + 1e-9))
        for li in range(L):
            for g in range(kvh):
                if len(kept[li][g]) > total:
                    rec = {p for p in kept[li][g] if p >= n - recent}
                    rest = sorted(kept[li][g] - rec, key=lambda p: -score[li][g][p])
                    kept[li][g] = rec | set(rest[: total - recent])

    history = []
    with torch.inference_mode():
        for pos, tok in enumerate(prompt):
            nxt = feed(tok, pos)
        evict(len(prompt))
        history.append((nxt, [[set(s) for s in layer] for layer in kept]))
        for i in range(steps):
            pos = len(prompt) + i
            nxt = feed(nxt, pos)
            evict(pos + 1)
            history.append((nxt, [[set(s) for s in layer] for layer in kept]))
    return history


def test_h2o_decode_steps_follow_the_definition():
    from backends.kvcache import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model="tiny-llama", seed=3,
                                    policy="h2o", policy_params={"heavy_ratio": HEAVY, "recent_ratio": RECENT}))
    with torch.no_grad():  # larger weights than the default init: peaked attention, clear-cut choices
        for p in engine.model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    prompt = [(7 * i + 3) % 500 + 5 for i in range(40)]
    steps = 8
    want = _plain_h2o_decode(engine, prompt, steps)
    engine.add_request("r", prompt, max_tokens=steps + 2)
    for tok, sets in want:
        (out,) = engine.step()
        assert out.new_token_ids == [tok]
        got = engine.kept_positions("r")
        for layer, per_head in enumerate(sets):
            for head, positions in enumerate(per_head):
                assert set(got[layer, :, head].tolist()) == positions, (layer, head)
