"""Models loaded from a Hugging Face folder (config.json + safetensors) decode exactly as
transformers does: Llama with GQA and untied head, Qwen2 (biases on q/k/v, none on o_proj), OPT
(pre-LN), and OPT-350m-style (post-LN, projected embeddings)."""

from __future__ import annotations

import pytest
import torch

from backends.kvcache import EngineConfig, LLMEngine

PROMPTS = [[5, 17, 42, 99, 3], [250, 7, 7, 31, 64, 128, 12, 77, 8, 1, 19], [300]]
NEW = 10


def hf_model(kind: str):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    if kind == "llama-gqa":
        cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=False, rope_theta=10000.0)
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=False, rope_theta=1000000.0)
        model = Qwen2ForCausalLM(cfg)
    else:
        post_ln = kind == "opt-post-ln"
        cfg = OPTConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                        max_position_embeddings=128, word_embed_proj_dim=32 if post_ln else 64,
                        do_layer_norm_before=not post_ln)
        model = OPTForCausalLM(cfg)
    with torch.no_grad():  # larger random weights: peaked logits, so greedy choices are clear-cut
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):  # qwen2's q/k/v biases: nonzero so a misplaced one shows
                p.normal_(0.0, 0.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2", "opt", "opt-post-ln"])
def test_hf_folder_greedy_matches_transformers(kind, tmp_path):
    from transformers import GenerationConfig

    model = hf_model(kind)
    model.save_pretrained(tmp_path)
    engine = LLMEngine(EngineConfig(model=str(tmp_path), weights="real", max_num_seqs=2))
    gen = GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = torch.tensor([p])
            want.append(model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)[0, len(p):].tolist())
    assert engine.generate(PROMPTS, NEW) == want
    assert engine.tokenizer is None
