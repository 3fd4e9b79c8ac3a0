"""misa.memory: the estimate against live tensors and autograd's saved tensors on small real models,
and the LLaMA-2-7B / LLaMA-3-8B numbers against hand-computed and published values."""
from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch

import misa
from misa import memory
from misa_examples import models

SMALL = models.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=80, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2)
BATCH, SEQ = 2, 16

# method, MISA options, estimate options
SAMPLED = [
    ("adamw", dict(sampler="full"), {}),
    ("misa", dict(delta=0.1), dict(delta=0.1)),
    ("misa", dict(delta=0.3, non_block="embed_head"), dict(delta=0.3, non_block="embed_head")),
    ("lisa", dict(sampler="lisa", sampler_options=dict(n_layers=1)), dict(n_layers=1)),
    ("badam", dict(sampler="badam"), {}),
]


def _model(dtype, seed=0):
    torch.manual_seed(seed)
    return models.build(SMALL, "cpu", dtype)


def _tokens(step):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, SMALL.vocab_size, (BATCH, SEQ), generator=g)


# ------------------------------------------------------------------ against measurement


@pytest.mark.parametrize("dtype,method,options,est_options",
                         [(torch.bfloat16, *case) for case in SAMPLED]
                         + [(torch.float32, *case) for case in SAMPLED[:2]],
                         ids=lambda v: str(v) if isinstance(v, (str, torch.dtype)) else "")
def test_estimate_equals_live_tensors_and_saved_activations(dtype, method, options, est_options):
    model = _model(dtype)
    opt = misa.MISA(model, lr=1e-3, interval=2, seed=0, warmup_sweep=False, **options)
    peak_live = peak_saved = 0
    for step in range(6):
        x = _tokens(step)
        holder = {}
        saved = memory.saved_tensor_bytes(model, lambda: holder.setdefault("loss", model(x, labels=x)))
        holder["loss"].backward()
        before = opt.active_modules
        active = None if method == "adamw" else before
        est = memory.estimate(model, method, active=active, batch=BATCH, seq_len=SEQ, **est_options)
        assert abs(est.activations - saved) <= 8, f"step {step}: estimate {est.activations}, saved {saved}"
        peak_saved = max(peak_saved, saved)
        opt.step()
        if opt.active_modules == before:  # no switch: this set's gradients and its state (made lazily) alive
            live = memory.measure(model, opt)
            assert (est.weights, est.gradients, est.masters, est.moments) == \
                (live.weights, live.gradients, live.masters, live.moments), f"step {step}, active {active}"
            assert est.trained_params == live.trained_params
            peak_live = max(peak_live, live.weights + live.optimizer)
        opt.zero_grad()
    assert peak_live > 0, "no step without a switch: nothing was compared"
    default = memory.estimate(model, method, batch=BATCH, seq_len=SEQ, **est_options)  # the largest active set
    assert default.weights + default.optimizer == pytest.approx(peak_live, rel=0.05)
    assert default.activations == pytest.approx(peak_saved, rel=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_estimate_equals_peft_model(dtype):
    peft = pytest.importorskip("peft")
    model = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(memory.LLAMA_LINEARS)), _model(dtype))
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in adapters:
        p.data = p.data.float()  # as peft.get_peft_model makes them
    opt = torch.optim.AdamW(adapters, lr=1e-3)
    est = memory.estimate(_model(dtype), "lora", rank=4, batch=BATCH, seq_len=SEQ)
    for step in range(2):
        x = _tokens(step)
        holder = {}
        saved = memory.saved_tensor_bytes(model, lambda: holder.setdefault("loss", model(x, labels=x)))
        holder["loss"].backward()
        if step == 1:  # torch.optim.AdamW makes its state at the first step
            live = memory.measure(model, opt)
            steps_bytes = 4 * len(adapters)  # AdamW's per-tensor step counters, counted as moments
            assert (est.weights, est.gradients, est.masters, est.moments + steps_bytes) == \
                (live.weights, live.gradients, live.masters, live.moments)
            assert abs(est.activations - saved) <= 8
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("non_block", ["frozen", "embed_head", "trained"])
@pytest.mark.parametrize("active", [
    ["model.layers.1.self_attn.q_proj"],
    ["model.layers.0.mlp.up_proj"],
    ["model.layers.2.mlp.gate_proj"],
    ["model.layers.1.mlp.down_proj", "model.layers.2.self_attn.o_proj"],
    ["model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.k_proj"],
])
def test_activations_follow_the_lowest_active_module(active, non_block):
    """Frozen modules above the lowest active one still save what the backward needs; nothing
    below it saves anything: the estimate matches autograd's saved tensors in every case."""
    model = _model(torch.bfloat16)
    part = misa.partition(model)
    trained = {n for m in part.modules if m.name in active for n in m.param_names}
    trained |= {n for n, _ in part.non_block_trained(non_block)}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    x = _tokens(0)
    saved = memory.saved_tensor_bytes(model, lambda: model(x, labels=x))
    est = memory.estimate(model, "misa", active=active, non_block=non_block, batch=BATCH, seq_len=SEQ)
    assert abs(est.activations - saved) <= 8


def test_estimate_of_a_config_allocates_nothing_and_equals_the_model_on_cpu():
    model, _ = memory._model_and_config("llama3-8b", None)
    assert all(p.is_meta for p in model.parameters())
    small = memory.estimate(SMALL, "misa", delta=0.2, dtype=torch.float32, batch=2, seq_len=8)
    real = memory.estimate(_model(torch.float32), "misa", delta=0.2, batch=2, seq_len=8)
    assert small == real


# ------------------------------------------------------------------ LLaMA-2-7B and LLaMA-3-8B

LLAMA2_7B_PARAMS = 6_738_415_616  # the published count of Llama-2-7b-hf
LLAMA3_8B_PARAMS = 8_030_261_248  # the published count of Meta-Llama-3-8B
BADAM_SETTING = dict(batch=2, seq_len=1024, checkpointing=True)


def test_llama_shapes_have_the_published_parameter_counts():
    assert memory.estimate("llama2-7b", "adamw").total_params == LLAMA2_7B_PARAMS
    assert memory.estimate("llama3-8b", "adamw").total_params == LLAMA3_8B_PARAMS


def test_adamw_bytes_per_parameter():
    p = LLAMA2_7B_PARAMS
    mixed = memory.estimate("llama2-7b", "adamw")
    assert (mixed.weights, mixed.gradients, mixed.masters, mixed.moments) == (2 * p, 2 * p, 4 * p, 8 * p)
    assert memory.estimate("llama2-7b", "adamw", master_weights=False).optimizer == 10 * p
    assert memory.estimate("llama2-7b", "adamw", fp32_grad_copy=True).optimizer == 18 * p  # BAdam's "18M"
    assert memory.estimate("llama2-7b", "adamw", dtype=torch.float32).optimizer == 12 * p


def test_misa_at_3_percent_fills_the_budget_with_14_or_18_bytes_per_trained_parameter():
    budget = int(0.03 * LLAMA2_7B_PARAMS)
    ours = memory.estimate("llama2-7b", "misa", delta=0.03)
    released = memory.estimate("llama2-7b", "misa", delta=0.03, fp32_grad_copy=True)
    assert 0.99 * budget <= ours.trained_params <= budget
    assert ours.optimizer == 14 * ours.trained_params
    assert released.optimizer == 18 * released.trained_params
    assert ours.weights == 2 * LLAMA2_7B_PARAMS


def test_misa_goes_below_one_layer_where_layer_methods_cannot():
    for name in ("llama2-7b", "llama3-8b"):
        block = memory.estimate(name, "badam")
        misa_1 = memory.estimate(name, "misa", delta=0.01)
        assert misa_1.trained_params < 0.4 * block.trained_params
        assert misa_1.optimizer < 0.4 * block.optimizer


def test_llama2_7b_at_3_percent_fits_under_badams_published_peak():
    """BAdam's README: 21.8 GB for Llama 2-7B (batch 2, activation checkpointing)."""
    for copy_grads in (False, True):
        est = memory.estimate("llama2-7b", "misa", delta=0.03, fp32_grad_copy=copy_grads, **BADAM_SETTING)
        assert est.total <= 21.8e9
    badam = memory.estimate("llama2-7b", "badam", fp32_grad_copy=True, **BADAM_SETTING)
    assert 16e9 < badam.total <= 21.8e9  # the rest of the published peak: allocator and CUDA context


def test_activation_formula_by_hand_for_llama2_7b():
    """Full training, bf16, no checkpointing, every block saves per token: 2 RMSNorms' fp32
    inputs and 1/rms, their normalised inputs and outputs, q, k, v, attention output, log-sum-exp,
    silu's input, up's output, silu's output and down's input."""
    h, i, heads, vocab, layers, e = 4096, 11008, 32, 32000, 32, 2
    block = 2 * (4 * h + 4) + 2 * e * h + 2 * e * h + 4 * e * h + 4 * heads + 3 * e * i + e * i
    head = 4 * h + 4 + e * h + e * h  # final norm: fp32 input, 1/rms, normalised input; the head's input
    batch, seq = 1, 512
    expected = (layers * block + head + 8) * batch * seq + (4 * vocab + 8) * batch * (seq - 1) \
        + 2 * seq * (h // heads) * e
    assert memory.estimate("llama2-7b", "adamw", batch=batch, seq_len=seq).activations == expected
    ckpt = memory.estimate("llama2-7b", "adamw", batch=batch, seq_len=seq, checkpointing=True).activations
    assert ckpt == expected - (layers - 1) * block * seq + layers * e * h * seq


# ------------------------------------------------------------------ the budget fill


def test_largest_fill_is_the_best_subset_sum():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.choice([3, 5, 7, 11, 12]) for _ in range(rng.randint(1, 9))]
        budget = rng.randint(min(sizes), sum(sizes))
        best = max(sum(c) for r in range(len(sizes) + 1) for c in itertools.combinations(sizes, r)
                   if sum(c) <= budget)
        chosen = memory._largest_fill(sizes, budget)
        assert sum(sizes[i] for i in chosen) == best, (sizes, budget, chosen)
        assert len(set(chosen)) == len(chosen)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(method="sgd"), ValueError, "unknown method 'sgd'; choose one of adamw, lora, lisa, badam, misa"),
    (dict(delta=0.0), ValueError, r"delta must lie in \(0, 1\]"),
    (dict(delta=1e-7), ValueError, r"delta=1e-07 allows \d+ parameters, fewer than the smallest module"),
    (dict(batch=2), ValueError, "give both batch and seq_len"),
    (dict(batch=0, seq_len=4), ValueError, "batch must be a positive int"),
    (dict(method="lora", rank=0), ValueError, "LoRA rank must be a positive int"),
    (dict(active=["model.layers.9.mlp.up_proj"]), ValueError, "active modules not in the module partition"),
    (dict(method="adamw", active=["model.layers.0"]), ValueError, "active modules only apply to"),
    (dict(non_block="some"), ValueError, "unknown non_block policy 'some'"),
    (dict(method="lisa", n_layers=7), ValueError, r"n_layers must be an int in \[1, 3\]"),
    (dict(method="badam", n_layers=1), ValueError, "n_layers only applies to lisa, not 'badam'"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    kwargs = {"method": "misa", **kwargs}
    with pytest.raises(error, match=match):
        memory.estimate(SMALL, **kwargs)


def test_unknown_config_and_non_llama_models_are_named():
    with pytest.raises(ValueError, match="unknown config 'llama-9b'"):
        memory.estimate("llama-9b", "adamw")
    mlp = torch.nn.Module()
    mlp.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
    assert memory.estimate(mlp, "adamw").optimizer == 12 * 40  # fp32: gradient 4 + moments 8, no master
    with pytest.raises(ValueError, match="needs a LLaMA-style config"):
        memory.estimate(mlp, "adamw", batch=1, seq_len=4)
    with pytest.raises(ValueError, match="no nn.Linear named"):
        memory.estimate(mlp, "lora")
