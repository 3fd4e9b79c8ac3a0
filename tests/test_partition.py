"""misa.partition on Hugging Face architectures (built from configs, no hub), custom stacks,
patterns, tied weights and the meta device."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import misa
from misa_examples import models

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra")


def _hf(name, **config):
    cls = getattr(transformers, f"{name}Config")
    model_cls = getattr(transformers, f"{name}ForCausalLM" if name != "GPT2" else "GPT2LMHeadModel")
    return model_cls(cls(**config))


SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2)


@pytest.mark.parametrize("arch", ["Llama", "Qwen2", "Mistral"])
def test_llama_like_blocks_give_seven_modules_each(arch):
    model = _hf(arch, **SMALL)
    part = misa.partition(model)
    assert part.block_lists == ["model.layers"]
    assert len(part.modules) == 7 * 3
    names = [m.name for m in part.modules[:7]]
    assert names == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + \
        [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    if arch == "Qwen2":  # q, k, v carry biases: they belong to their module
        assert part.modules[0].param_names == ("model.layers.0.self_attn.q_proj.weight",
                                               "model.layers.0.self_attn.q_proj.bias")
    kinds = set(part.non_block_kind.values())
    assert kinds == {"embedding", "head", "norm"}
    assert part.total_params == sum(p.numel() for p in model.parameters())
    assert sum(m.numel for m in part.modules) + sum(p.numel() for _, p in part.non_block) == part.total_params


def test_gpt2_naming_and_tied_embeddings():
    model = _hf("GPT2", vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    part = misa.partition(model)
    assert part.block_lists == ["transformer.h"]
    assert [m.name for m in part.modules[:4]] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                                  "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    # lm_head is tied to wte: counted once, as the embedding
    assert part.total_params == sum(p.numel() for p in model.parameters())
    assert "lm_head.weight" not in part.non_block_kind


def test_layer_granularity_holds_every_block_parameter():
    model = models.build(models.LlamaConfig(num_hidden_layers=2), "meta")
    part = misa.partition(model, granularity="layer")
    assert [m.name for m in part.modules] == ["model.layers.0", "model.layers.1"]
    assert part.modules[0].numel == sum(p.numel() for p in model.model.layers[0].parameters())
    assert part.granularity == "layer"


def test_patterns_group_by_matched_text():
    model = models.build(models.LlamaConfig(num_hidden_layers=2), "meta")
    part = misa.partition(model, patterns=[r"layers\.\d+\.self_attn", r"layers\.\d+\.mlp"])
    assert [m.name for m in part.modules] == ["model.layers.0.self_attn", "model.layers.0.mlp",
                                              "model.layers.1.self_attn", "model.layers.1.mlp"]
    assert [m.block for m in part.modules] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="invalid pattern"):
        misa.partition(model, patterns=["(unclosed"])


def test_frozen_parameters_are_not_candidates():
    model = models.build(models.LlamaConfig(num_hidden_layers=2))
    for p in model.model.layers[1].parameters():
        p.requires_grad_(False)
    part = misa.partition(model)
    assert all(m.block == 0 for m in part.modules)
    assert part.total_params == sum(p.numel() for p in model.parameters())


def test_nested_module_lists_use_the_outermost():
    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(4, 4)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(Expert() for _ in range(3))
            self.norm = nn.LayerNorm(4)

    model = nn.Module()
    model.blocks = nn.ModuleList(Block() for _ in range(2))
    part = misa.partition(model)
    assert part.block_lists == ["blocks"]
    assert [m.name for m in part.modules] == [f"blocks.{b}.experts.{e}.w" for b in range(2) for e in range(3)]


def test_summary_reports_the_budget():
    part = misa.partition(models.build(models.CONFIGS["llama2-7b"], "meta"))
    text = part.summary(delta=0.03)
    assert "224 modules in 32 blocks" in text and "6.74B" in text and "202.15M" in text
