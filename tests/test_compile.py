"""torch.compile across switches: a user who compiles the whole model or each block, and the
optimizer step, trains through 100+ switches of the active set without reaching dynamo's
recompile limit (each switch flips requires_grad on the sampled parameters, which compiled
graphs guard on; see misa._compile). The number of graphs compiled is printed and bounded."""
from __future__ import annotations

import pytest
import torch

import misa

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra")

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, use_cache=False)
SWITCHES = 120


def _compiled_run(how: str, graph_breaks: bool = True):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    opt = misa.MISA(model, lr=1e-3, delta=0.12, interval=1, seed=0)
    if not graph_breaks:
        misa._compile.restore(opt._sampled_modules)
    if how == "whole":
        forward = torch.compile(model, backend="aot_eager")
    else:
        for layer in model.model.layers:
            layer.compile(backend="aot_eager")
        forward = model
    step = torch.compile(opt.step, backend="aot_eager")
    sets = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(SWITCHES):
        x = torch.randint(0, CONFIG["vocab_size"], (2, 8), generator=g)
        forward(input_ids=x, labels=x).loss.backward()
        step()
        opt.zero_grad()
        sets.add(tuple(opt.active_modules))
    limits = [k for k in counters["unimplemented"] if "recompile limit" in k.lower() or "cache_size_limit" in k]
    return len(sets), counters["stats"]["unique_graphs"], limits


@pytest.mark.parametrize("how", ["whole", "per_block"])
def test_compiled_model_and_step_train_through_many_switches_without_the_recompile_limit(how, capsys):
    distinct_sets, graphs, limits = _compiled_run(how)
    with capsys.disabled():
        print(f"\n[compile {how}] {SWITCHES} switches, {distinct_sets} distinct active sets, {graphs} graphs compiled")
    assert distinct_sets > 50
    assert not limits, limits
    assert graphs <= 60  # a handful of variants per graph piece, not one per active set


def test_without_the_graph_breaks_the_limit_is_reached():
    """The control: the same run with the sampled modules inside the graphs recompiles until
    dynamo gives up on the frame."""
    _, _, limits = _compiled_run("whole", graph_breaks=False)
    assert limits
