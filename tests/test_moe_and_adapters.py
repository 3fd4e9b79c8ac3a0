"""Mixture-of-experts and PEFT models under MISA's defaults: every expert slice is a module with
its own state and every adapter trains (transformers and peft, tiny random-init configs)."""
from __future__ import annotations

import pytest
import torch

import misa

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra")


def _mixtral(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=512, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, use_cache=False)
    return transformers.MixtralForCausalLM(config).to(dtype)


def _qwen2_moe():
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(vocab_size=512, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         decoder_sparse_step=1, mlp_only_layers=[], use_cache=False)
    return transformers.Qwen2MoeForCausalLM(config)


def _train(model, opt, steps, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, vocab, (4, 16), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


def _stacked(model):
    return {n: p for n, p in model.named_parameters() if p.dim() == 3}


@pytest.mark.parametrize("build", [_mixtral, _qwen2_moe], ids=["mixtral", "qwen2_moe"])
def test_every_expert_slice_is_a_module_and_trains_under_defaults(build):
    model = build()
    part = misa.partition(model)
    summary = part.summary(delta=0.03)
    assert "experts: 16 modules, one per expert slice (4 experts in each of 4 stacked tensors" in summary
    assert "gate_up_proj[e] x8" in summary and "down_proj[e] x8" in summary
    experts = [m for m in part.modules if m.kind == "expert"]
    assert [m.name for m in experts[:5]] == [f"model.layers.0.mlp.experts.gate_up_proj[{e}]" for e in range(4)] + \
        ["model.layers.0.mlp.experts.down_proj[0]"]
    stacked = _stacked(model)
    assert all(m.numel == stacked[m.pieces[0].name.split("[")[0]][0].numel() for m in experts)
    assert "model.layers.0.mlp.gate" in [m.name for m in part.modules]  # the router: an ordinary module

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = misa.MISA(model, lr=1e-2, interval=5, seed=0)  # defaults: delta 0.03, embeddings/head/norms frozen
    _train(model, opt, 30)
    in_modules = {piece.name.split("[")[0] for m in part.modules for piece in m.pieces}
    unchanged = [n for n in in_modules if torch.equal(dict(model.named_parameters())[n], before[n])]
    assert not unchanged, f"block parameters never trained: {unchanged}"
    for name, p in stacked.items():
        changed = [not torch.equal(p[e], before[name][e]) for e in range(p.shape[0])]
        assert all(changed), f"{name}: experts changed {changed}"
    assert opt.coverage().steps and min(opt.coverage().steps.values()) > 0


def test_expert_slices_hold_their_own_state_only_while_active():
    model = _mixtral(torch.bfloat16)
    opt = misa.MISA(model, lr=1e-2, delta=0.06, interval=3, seed=1, warmup_sweep=False)
    modules = {m.name: m for m in opt.partition.modules}
    partly_active = 0
    for step in range(12):
        _train(model, opt, 1, seed=step)
        if opt.coverage().steps and step % 3 == 2:
            continue  # this step switched: the new set gets its state at its first step
        for name, p in _stacked(model).items():
            active = {piece.expert for m in opt.active_modules for piece in modules[m].pieces if piece.param is p}
            state = opt.state.get(p, {})
            assert set(state) == active, (name, set(state), active)
            assert p.requires_grad == bool(active)
            partly_active += 0 < len(active) < p.shape[0]
            for e, tensors in state.items():
                assert tensors["exp_avg"].shape == p.shape[1:] and tensors["master"].dtype == torch.float32
                assert torch.equal(tensors["master"].to(torch.bfloat16), p[e])
    assert partly_active > 0  # some stacked tensor trained only some of its experts


def test_expert_slices_update_like_adamw_on_the_slice():
    """A slice's AdamW step through the kernels, on the view, equals torch AdamW on that slice."""
    model = _mixtral()
    opt = misa.MISA(model, lr=1e-2, sampler="full", weight_decay=0.1)
    ref = {n: p.detach().clone().requires_grad_(True) for n, p in _stacked(model).items()}
    ref_opt = torch.optim.AdamW(list(ref.values()), lr=1e-2, weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x = torch.randint(0, 512, (4, 16), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        for n, p in _stacked(model).items():
            ref[n].grad = p.grad.clone()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
    for n, p in _stacked(model).items():
        torch.testing.assert_close(p, ref[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_adapters_of_one_layer_form_one_module_and_all_train(dora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora))
    part = misa.partition(model)
    assert len(part.modules) == 14 and {m.kind for m in part.modules} == {"adapter"}
    q = part.modules[0]
    assert q.name == "base_model.model.model.layers.0.self_attn.q_proj"
    expected = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if dora else set())
    assert {n.split(".")[-3] for n in q.param_names} == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = misa.MISA(model, lr=1e-2, delta=0.03, interval=4, seed=0)
    _train(model, opt, 80, vocab=64)
    adapters = [n for n, _ in model.named_parameters() if "lora_" in n]
    unchanged = [n for n in adapters if torch.equal(dict(model.named_parameters())[n], before[n])]
    assert not unchanged, f"adapters never changed: {unchanged}"
    frozen_base = [n for n, p in model.named_parameters() if "lora_" not in n]
    assert all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in frozen_base)
