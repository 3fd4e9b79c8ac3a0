"""The MISA optimizer: AdamW equivalence, sparse state, budget, sampling statistics, resume."""
from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import misa
import misa_kernels as mk
from misa_examples import models
from conftest import BACKEND_DEVICE

TINY = models.LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                          num_attention_heads=2, num_key_value_heads=2)


def _model(dtype=torch.float32, device="cpu", seed=0, config=TINY):
    torch.manual_seed(seed)
    return models.build(config, device, dtype)


def _batch(seed, config=TINY, batch=3, length=11, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=g).to(device)


def _train(model, opt, steps, start=0, scaler=None):
    losses = []
    for i in range(start, start + steps):
        x = _batch(i, device=next(model.parameters()).device)
        loss = model(x, labels=x)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _groups_like(model, groups_of):
    """The same grouping (given as lists of parameter names per group, with options) for `model`."""
    named = dict(model.named_parameters())
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [named[n] for n in g["params"]]}
            for g in groups_of]


def _name_groups(model):
    """Three groups with every option different: attention (its own lr and betas), MLP (its own
    eps and weight decay), the rest (the defaults)."""
    names = [n for n, _ in model.named_parameters()]
    attn = [n for n in names if "self_attn" in n]
    mlp = [n for n in names if ".mlp." in n]
    rest = [n for n in names if n not in attn and n not in mlp]
    return [{"params": attn, "lr": 5e-3, "betas": (0.8, 0.99)},
            {"params": mlp, "eps": 1e-6, "weight_decay": 0.3},
            {"params": rest}]


# ------------------------------------------------------------------ full == AdamW


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("max_grad_norm,grouped", [(None, False), (0.5, False), (None, True), (0.5, True)])
def test_full_sampler_matches_torch_adamw(backend, device, max_grad_norm, grouped):
    ours, ref = _model(device=device), _model(device=device)
    defaults = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    if grouped:
        layout = _name_groups(ours)
        opt = misa.MISA(ours, **defaults, param_groups=_groups_like(ours, layout), sampler="full",
                        max_grad_norm=max_grad_norm, backend=backend)
        ref_opt = torch.optim.AdamW(_groups_like(ref, layout), **defaults, foreach=False)
    else:
        opt = misa.MISA(ours, **defaults, sampler="full", max_grad_norm=max_grad_norm, backend=backend)
        ref_opt = torch.optim.AdamW(ref.parameters(), **defaults, foreach=False)
    assert opt.active_params == sum(p.numel() for p in ours.parameters())
    for step in range(15):
        x = _batch(step, device=device)
        ours(x, labels=x).backward()
        ref(x, labels=x).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), max_grad_norm)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} after 15 steps")
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"], rtol=1e-4, atol=1e-10)


def test_full_sampler_follows_an_lr_scheduler():
    ours, ref = _model(), _model()
    layout = _name_groups(ours)
    opt = misa.MISA(ours, lr=1e-2, sampler="full", param_groups=_groups_like(ours, layout))
    ref_opt = torch.optim.AdamW(_groups_like(ref, layout), lr=1e-2, weight_decay=0.0, foreach=False)
    lambdas = [lambda s: 1.0 / (1 + s), lambda s: 0.5 ** s, lambda s: 1.0]  # one per group
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambdas) for o in (opt, ref_opt)]
    for step in range(4):
        x = _batch(step)
        for model, o, s in ((ours, opt, scheds[0]), (ref, ref_opt, scheds[1])):
            model(x, labels=x).backward()
            o.step()
            o.zero_grad()
            s.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-3 / 5, 1e-2 / 16, 1e-2])
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ sparse state


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_inactive_modules_untouched_and_stateless(backend, device):
    model = _model(device=device)
    opt = misa.MISA(model, lr=1e-2, delta=0.1, interval=2, seed=3, backend=backend)
    budget = opt.partition.budget(0.1)
    names = dict(model.named_parameters())
    for step in range(10):
        active = set(opt.active_modules)
        before = {n: p.detach().clone() for n, p in names.items()}
        x = _batch(step, device=device)
        model(x, labels=x).backward()
        for module in opt.partition.modules:
            for p in module.params:
                if module.name in active:
                    assert p.grad is not None and p.requires_grad
                else:
                    assert p.grad is None and not p.requires_grad, f"{module.name} inactive but has a gradient"
                    assert p not in opt.state, f"{module.name} inactive but has state"
        for name, p in opt.partition.non_block:  # frozen by default under misa
            assert p.grad is None and p not in opt.state
        opt.step()
        opt.zero_grad()
        for module in opt.partition.modules:
            if module.name not in active:
                for pname in module.param_names:
                    assert torch.equal(names[pname], before[pname]), f"inactive {pname} changed"
        used = sum(m.numel for m in opt.partition.modules if m.name in opt.active_modules)
        assert 0 < used <= budget


def test_dropped_modules_free_their_state_and_memory_stays_flat():
    model = _model(torch.bfloat16)
    opt = misa.MISA(model, lr=1e-3, delta=0.15, interval=1, seed=0, warmup_sweep=False, sample_last=0)
    sizes = []
    for _ in range(1000):
        opt._switch(opt.sampler.select(1))
        opt._active.update_groups()  # the state of the new set, as the next step makes it
        active_numel = sum(p.numel() for p in opt.state)
        state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
        assert state_bytes == 12 * active_numel  # fp32 master + exp_avg + exp_avg_sq, nothing else
        sizes.append(len(opt.state))
    assert max(sizes) <= max(len(m.params) for m in opt.partition.modules) * 10
    assert all(all(t.dtype == torch.float32 for t in s.values()) for s in opt.state.values())


def test_keep_reselected_keeps_state_and_clear_all_resets_it():
    for keep in (True, False):
        model = _model()
        opt = misa.MISA(model, lr=1e-2, sampler="full", keep_reselected=keep)
        x = _batch(0)
        model(x, labels=x).backward()
        opt.step()
        p = opt.partition.modules[0].params[0]
        before = opt.state[p]["exp_avg"].clone()
        opt._switch(list(opt._active.modules))
        assert (p in opt.state) == keep  # a cleared piece gets fresh state at its next step
        if keep:
            assert torch.equal(opt.state[p]["exp_avg"], before)
        assert opt._active.steps[0].item() == (1.0 if keep else 0.0)


# ------------------------------------------------------------------ low precision


def test_bf16_model_keeps_fp32_masters_for_active_modules_only():
    model = _model(torch.bfloat16)
    opt = misa.MISA(model, lr=1e-2, delta=0.2, interval=3, seed=1)
    _train(model, opt, 7)
    for module in opt.partition.modules:
        for p in module.params:
            if module.name in opt.active_modules:
                master = opt.state[p]["master"]
                assert master.dtype == torch.float32
                assert torch.equal(p.detach(), master.to(torch.bfloat16))
            else:
                assert p not in opt.state


def test_fp16_with_grad_scaler_skips_overflowing_steps():
    model = _model(torch.float16)
    opt = misa.MISA(model, lr=1e-3, sampler="full")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)  # overflows at first
    before = [p.detach().clone() for p in model.parameters()]
    x = _batch(0)
    scaler.scale(model(x, labels=x)).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert scaler.get_scale() < 2.0 ** 40
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    scaler.update(new_scale=1024.0)
    losses = _train(model, opt, 12, start=1, scaler=scaler)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(math.isfinite(v) for v in losses)


def test_nonfinite_gradient_skips_the_step_untouched():
    model = _model()
    opt = misa.MISA(model, lr=1e-2, sampler="full")
    _train(model, opt, 2)
    params = [p.detach().clone() for p in model.parameters()]
    states = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    steps = opt._active.steps.clone()
    x = _batch(5)
    model(x, labels=x).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.step()
    assert opt.last_stats.found_inf.item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(v, states[id(p)][k]) for p, s in opt.state.items() for k, v in s.items())
    assert torch.equal(opt._active.steps, steps)


def test_skip_nonfinite_false_uses_fused_norms_and_matches():
    results = []
    for skip in (True, False):
        model = _model()
        opt = misa.MISA(model, lr=1e-2, delta=0.15, interval=3, seed=4, skip_nonfinite=skip)
        _train(model, opt, 8)
        results.append(([p.detach().clone() for p in model.parameters()], opt.sampler.scores.clone(),
                        list(opt.active_modules)))
    (p1, s1, a1), (p2, s2, a2) = results
    assert a1 == a2
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=0)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ sampling


def _fixed_prob_sampler(probs, delta_modules=1, n=None, seed=0):
    """A misa sampler over `n` equal modules whose probabilities stay `probs`."""
    n = n or len(probs)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Linear(10, 10, bias=False) for _ in range(n))
    part = misa.partition(model)
    sampler = MISA_SAMPLER(part, delta=delta_modules * 100 / part.total_params, interval=1,
                           generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"),
                           sample_last=0, warmup_sweep=False)
    sampler.probs = torch.tensor(probs, dtype=torch.float64)
    return sampler


MISA_SAMPLER = misa.samplers.get("misa")


def test_draw_frequencies_follow_the_probabilities():
    probs = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
    sampler = _fixed_prob_sampler(probs)
    draws = 6000
    counts = [0] * len(probs)
    for _ in range(draws):
        rest = list(range(len(probs)))
        chosen = sampler.fill(sampler.random_order(rest, sampler.probs))
        assert len(chosen) == 1
        counts[chosen[0]] += 1
    chi2 = sum((c - draws * p) ** 2 / (draws * p) for c, p in zip(counts, probs))
    assert chi2 < 20.5, f"chi-square {chi2:.1f} (5 dof, p=0.001 threshold 20.5); counts {counts}"


def test_second_draw_follows_sampling_without_replacement():
    probs = [0.5, 0.3, 0.2]
    sampler = _fixed_prob_sampler(probs, delta_modules=2)
    pairs = {}
    for _ in range(6000):
        chosen = tuple(sampler.fill(sampler.random_order([0, 1, 2], sampler.probs)))
        pairs[frozenset(chosen)] = pairs.get(frozenset(chosen), 0) + 1
    # P({0,1}) = .5*.3/.5 + .3*.5/.7 = 0.514...
    expected = 0.5 * 0.3 / 0.5 + 0.3 * 0.5 / 0.7
    assert abs(pairs[frozenset({0, 1})] / 6000 - expected) < 0.03


def test_large_eta_prefers_the_module_with_large_gradients():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8, bias=False) for _ in range(6))
    part = misa.partition(model)
    counts = {}
    for eta in (0.0, 5.0):
        opt = misa.MISA(model, lr=1e-3, delta=9 * 64 / part.total_params / 8, interval=1, eta=eta, seed=2,
                        sample_last=0)
        hits = 0
        for _ in range(300):
            for module in opt.partition.modules:
                for p in module.params:
                    if p.requires_grad:
                        scale = 10.0 if module.name == "layers.4" else 0.1
                        p.grad = torch.full_like(p, scale)
            opt.step()
            hits += "layers.4" in opt.active_modules
        counts[eta] = hits
    assert counts[5.0] > 250 and counts[0.0] < 120, counts


def test_same_seed_same_active_sets():
    sequences = []
    for _ in range(2):
        model = _model()
        opt = misa.MISA(model, lr=1e-2, delta=0.1, interval=2, seed=7)
        seq = []
        for step in range(10):
            x = _batch(step)
            model(x, labels=x).backward()
            opt.step()
            opt.zero_grad()
            seq.append(tuple(opt.active_modules))
        sequences.append(seq)
    assert sequences[0] == sequences[1]


def test_released_selection_on_llama2_7b_shapes_activates_about_seven_modules():
    model = models.build(models.CONFIGS["llama2-7b"], "meta")
    part = misa.partition(model)
    assert len(part.modules) == 224
    sampler = MISA_SAMPLER(part, delta=0.03, interval=50, generator=torch.Generator().manual_seed(0),
                           device=torch.device("cpu"), importance="released", sample_last=2, warmup_sweep=False)
    counts = []
    for step in range(0, 2000, 50):
        chosen = sampler.select(step)
        assert sum(sampler.sizes[b] for b in chosen) <= part.budget(0.03)
        counts.append(len(chosen))
    mean = sum(counts) / len(counts)
    assert 5 <= mean <= 9, f"mean {mean} modules per draw"


# ------------------------------------------------------------------ resume


def _run_with_checkpoint(tmp_path, total, save_at, dtype=torch.bfloat16, **kw):
    model = _model(dtype)
    opt = misa.MISA(model, lr=1e-2, delta=0.15, interval=3, seed=11, max_grad_norm=1.0, **kw)
    _train(model, opt, save_at)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(model, opt, total - save_at, start=save_at)
    return model, opt


@pytest.mark.parametrize("importance", ["paper", "released"])
def test_resume_is_bitwise_exact(tmp_path, importance):
    model, opt = _run_with_checkpoint(tmp_path, 14, 5, importance=importance)
    fresh = _model(torch.bfloat16, seed=99)
    fresh_opt = misa.MISA(fresh, lr=1e-2, delta=0.15, interval=3, seed=11, max_grad_norm=1.0, importance=importance)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    _train(fresh, fresh_opt, 9, start=5)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert fresh_opt.active_modules == opt.active_modules
    assert torch.equal(fresh_opt.sampler.scores, opt.sampler.scores)


def test_resume_in_a_fresh_process_is_bitwise_exact(tmp_path):
    model, _ = _run_with_checkpoint(tmp_path, 12, 6)
    script = textwrap.dedent(f"""
        import torch, misa
        from misa_examples import models
        import test_optimizer as t
        model = t._model(torch.bfloat16, seed=5)
        opt = misa.MISA(model, lr=1e-2, delta=0.15, interval=3, seed=11, max_grad_norm=1.0)
        ckpt = torch.load({str(tmp_path / 'ckpt.pt')!r})
        model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["opt"])
        t._train(model, opt, 6, start=6)
        torch.save(model.state_dict(), {str(tmp_path / 'resumed.pt')!r})
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    resumed = torch.load(tmp_path / "resumed.pt")
    for name, p in model.state_dict().items():
        assert torch.equal(p, resumed[name]), name


def test_load_state_dict_rejects_another_model():
    opt = misa.MISA(_model(), lr=1e-2, delta=0.1)
    other = misa.MISA(_model(config=TINY.with_(num_hidden_layers=2)), lr=1e-2, delta=0.1)
    with pytest.raises(ValueError, match="different model or partition"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="not a MISA optimizer state"):
        opt.load_state_dict(torch.optim.AdamW(_model().parameters()).state_dict())


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(delta=1e-6), ValueError, r"21 of 21 modules are larger than the budget of 0 parameters .*no module can ever"),
    (dict(delta=1.5), ValueError, r"Invalid delta: 1.5 \(must be finite and lie in \(0, 1\]\)"),
    (dict(delta=0.0), ValueError, r"Invalid delta: 0.0"),
    (dict(interval=0), ValueError, r"Invalid interval: 0"),
    (dict(interval=2.5), ValueError, "interval must be an int, got 2.5"),
    (dict(sampler="greedy"), ValueError, "unknown sampler 'greedy'; choose one of badam, full, lisa, misa"),
    (dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    (dict(betas=(0.9, 1.0)), ValueError, r"Invalid betas\[1\]: 1.0"),
    (dict(importance="max"), ValueError, "unknown importance rule 'max'"),
    (dict(non_block="some"), ValueError, "unknown non_block policy 'some'"),
    (dict(granularity="row"), ValueError, "unknown granularity 'row'"),
    (dict(max_grad_norm=0.0), ValueError, "Invalid max_grad_norm: 0.0"),
    (dict(sampler="badam", sampler_options={"order": "zigzag"}), ValueError, "unknown BAdam order 'zigzag'"),
    (dict(sampler="lisa", sampler_options={"n_layers": 9}), ValueError, r"n_layers must be an int in \[1, 3\]"),
    (dict(sampler="misa", sampler_options={"n_layers": 2}), TypeError, "unexpected options: n_layers"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    kwargs = {"delta": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        misa.MISA(_model(), **kwargs)


def test_model_without_blocks_needs_patterns():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="no repeated blocks found in Sequential.*patterns"):
        misa.MISA(mlp, lr=1e-2)
    opt = misa.MISA(mlp, lr=1e-2, patterns=[r"^\d+\."], delta=1.0)
    assert sorted(m.name for m in opt.partition.modules) == ["0", "2"]


def test_optimizer_rejects_a_parameter_list():
    with pytest.raises(TypeError, match="MISA takes the model"):
        misa.MISA(list(_model().parameters()), lr=1e-2)


def test_sparse_gradient_embeddings_are_refused_at_construction():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Embedding(10, 4, sparse=True) for _ in range(2))
    with pytest.raises(ValueError, match=r"layers.0 is an embedding with sparse=True"):
        misa.MISA(model, lr=1e-2, sampler="full")


def test_a_second_optimizer_on_the_same_model_sees_every_module():
    model = _model()
    first = misa.MISA(model, lr=1e-2, delta=0.1, seed=0)
    second = misa.MISA(model, lr=1e-2, delta=0.1, seed=0)
    assert [m.name for m in second.partition.modules] == [m.name for m in first.partition.modules]
    assert len(second.partition.non_block) == len(first.partition.non_block)
