"""MISA on two processes (gloo, CPU) against one process with the same global batch.

One two-process job (started once for this file: spawning costs more than the training)
runs every scenario and saves what each rank saw; the tests compare that with a
single-process run: data parallel with MISA's own gradient averaging (with and without
`no_sync` accumulation, in many buckets, with missing gradients), DDP re-wrapped at every
switch, FSDP2 with sharded state (and with a mixed-precision policy), agreement of the ranks
(seed broadcast, debug check), exact resume from torch.distributed.checkpoint, and the
gradient bytes sent.
"""
from __future__ import annotations

import datetime
import math
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import misa
from misa import distributed
from misa_examples import models

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

WORLD = 2
STEPS = 8
SAVE_AT = 3
CONFIG = models.LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                            num_attention_heads=2, num_key_value_heads=2)
OPTIONS = dict(lr=1e-2, delta=0.15, interval=2, max_grad_norm=0.1)  # clips about every other step
SEED = 11
#: parameters after 8 steps of lr 1e-2, 2 ranks vs one process. The averaged gradient of two half
#: batches differs from the full-batch gradient by float32 rounding only; measured 1.3e-5 (Adam
#: divides by sqrt(v), which magnifies rounding in small gradients). Without the gradient
#: averaging the difference is 6e-2, without the norm all-reduce under FSDP2 2e-2.
PARAM_ATOL = 1e-4
LOSS_RTOL = 1e-5
#: importance scores (EMA of squared norms per parameter) of the same runs.
SCORE_RTOL = 1e-4


def _model(seed=0):
    torch.manual_seed(seed)
    return models.build(CONFIG)


def _global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, CONFIG.vocab_size, (2 * WORLD, 11), generator=g)


def _rows(batch, rank):
    return batch[2 * rank: 2 * rank + 2]


# ------------------------------------------------------------------ the two-process job


def _dp_step(model, opt, step, rank):
    """One step on this rank's half of the global batch, in two micro-batches: on even steps
    the first backward runs under no_sync (averaged at step), on odd steps both backward
    passes average (the second one averages the accumulated sum again: same result)."""
    rows = _rows(_global_batch(step), rank)
    loss_sum = 0.0
    for i in range(2):
        x = rows[i: i + 1]
        context = opt.no_sync() if (i == 0 and step % 2 == 0) else torch.enable_grad()
        with context:
            loss = model(x, labels=x) / 2
            loss.backward()
        loss_sum += loss.detach()
    opt.step()
    opt.zero_grad()
    return _mean_over_ranks(loss_sum)


def _mean_over_ranks(value):
    value = value.detach().clone().reshape(1)
    dist.all_reduce(value)
    return float(value / WORLD)


def _plain_step(model, opt, step, rank):
    """One step on this rank's half of the global batch, one backward."""
    x = _rows(_global_batch(step), rank)
    loss = model(x, labels=x)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return _mean_over_ranks(loss)


def _full_params(model):
    return {n: (p.full_tensor() if distributed.is_dtensor(p) else p).detach().clone()
            for n, p in model.named_parameters()}


def _scenario_data_parallel(rank, tmp):
    model = _model()
    opt = misa.MISA(model, seed=SEED if rank == 0 else 99, debug_sync=True, **OPTIONS)
    result = {"seed": opt.seed, "losses": [], "active": [], "bytes": [], "active_bytes": [], "tensors": []}
    for step in range(STEPS):
        active = [p for p in model.parameters() if p.requires_grad]
        result["active_bytes"].append(sum(p.numel() * p.element_size() for p in active))
        result["tensors"].append(len(active))
        result["active"].append(list(opt.active_modules))
        before = opt.grad_sync.bytes_sent
        result["losses"].append(_dp_step(model, opt, step, rank))
        result["bytes"].append(opt.grad_sync.bytes_sent - before)
        if step + 1 == SAVE_AT:
            distributed.save_checkpoint(os.path.join(tmp, "dp"), model, opt)
    result["params"] = _full_params(model)
    result["scores"] = opt.sampler.scores.clone()
    result["frozen_grads"] = sum(p.grad is not None for p in model.parameters() if not p.requires_grad)

    result["resumed_params"] = _resume(os.path.join(tmp, "dp"), _model(seed=5), _dp_step, rank)
    return result


def _resume(path, fresh, step_fn, rank):
    """Loads the checkpoint at `path` into `fresh` (differently initialised) and a new MISA,
    runs the remaining steps, and returns the full parameters."""
    fresh_opt = misa.MISA(fresh, seed=SEED, **OPTIONS)
    distributed.load_checkpoint(path, fresh, fresh_opt)
    for step in range(SAVE_AT, STEPS):
        step_fn(fresh, fresh_opt, step, rank)
    return _full_params(fresh)


def _scenario_ddp_rewrap(rank, tmp):
    """The documented DDP alternative: a new DistributedDataParallel over the active modules
    after every switch (the reducer only knows what required grad when it was built)."""
    from torch.nn.parallel import DistributedDataParallel
    model = _model()
    opt = misa.MISA(model, seed=SEED, grad_sync=False, **OPTIONS)
    current = {"ddp": DistributedDataParallel(model, init_sync=False)}
    opt.register_switch_hook(lambda _: current.update(ddp=DistributedDataParallel(model, init_sync=False)))
    result = {"losses": [], "active": []}
    for step in range(STEPS):
        result["active"].append(list(opt.active_modules))
        x = _rows(_global_batch(step), rank)
        loss = current["ddp"](x, labels=x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        result["losses"].append(_mean_over_ranks(loss))
    result["params"] = _full_params(model)
    result["scores"] = opt.sampler.scores.clone()
    return result


def _sharded_model(seed=0, **fsdp_options):
    from torch.distributed.fsdp import fully_shard
    model = _model(seed)
    for layer in model.model.layers:
        fully_shard(layer, **fsdp_options)
    fully_shard(model, **fsdp_options)
    return model


def _count_reduce_scatter():
    """Wraps FSDP2's gradient reduction to count the gradient elements it reduce-scatters."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group
    counter = {"numel": 0}
    original = _fsdp_param_group.foreach_reduce

    def counting(fsdp_params, unsharded_grads, *args, **kwargs):
        counter["numel"] += sum(g.numel() for g in unsharded_grads)
        return original(fsdp_params, unsharded_grads, *args, **kwargs)

    _fsdp_param_group.foreach_reduce = counting
    return counter


def _scenario_fsdp(rank, tmp):
    counter = _count_reduce_scatter()
    model = _sharded_model()
    opt = misa.MISA(model, seed=SEED, debug_sync=True, **OPTIONS)
    result = {"losses": [], "active": [], "grad_numel": [], "active_numel": []}
    for step in range(STEPS):
        result["active"].append(list(opt.active_modules))
        result["active_numel"].append(opt.active_params)
        before = counter["numel"]
        result["losses"].append(_plain_step(model, opt, step, rank))
        result["grad_numel"].append(counter["numel"] - before)
        if (step + 1) % OPTIONS["interval"]:  # no switch in this step: the active set holds its state
            result["state"] = [(type(v).__name__, v.numel(), distributed.local(v).numel())
                               for s in opt.state.values() for v in s.values()]
        if step + 1 == SAVE_AT:
            distributed.save_checkpoint(os.path.join(tmp, "fsdp"), model, opt)
    result["params"] = _full_params(model)
    result["scores"] = opt.sampler.scores.clone()

    result["resumed_params"] = _resume(os.path.join(tmp, "fsdp"), _sharded_model(seed=5), _plain_step, rank)
    return result


def _scenario_fsdp_mixed_precision(rank, tmp):
    """bf16 compute, float32 reduction: blocks with no active module at the first forward
    must still get float32 gradients when their modules are activated later."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = _sharded_model(mp_policy=policy)
    opt = misa.MISA(model, lr=1e-2, delta=0.1, interval=1, seed=SEED)
    first = set(opt.active_modules)
    before = _full_params(model)
    dtypes, losses = set(), []
    for step in range(6):
        x = _rows(_global_batch(step), rank)
        loss = model(x, labels=x)
        loss.backward()
        dtypes |= {p.grad.dtype for p in model.parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    changed = {n.rsplit(".", 1)[0] for n, p in _full_params(model).items() if not torch.equal(p, before[n])}
    blocks = lambda names: {n.split(".")[2] for n in names}  # noqa: E731
    return {"dtypes": dtypes, "losses": losses, "new_blocks": blocks(changed) - blocks(first)}


def _scenario_desync(rank, tmp):
    model = _model()
    opt = misa.MISA(model, seed=SEED, debug_sync=True, sampler="lisa", sampler_options={"n_layers": 1},
                    interval=1)
    if rank == 1:
        opt.generator.manual_seed(12345)  # what a rank-dependent seed without the broadcast would do
    try:
        for step in range(4):
            _plain_step(model, opt, step, rank)
    except RuntimeError as error:
        return {"error": str(error)}
    return {"error": None}


def _scenario_buckets(rank, tmp):
    """Averaging in many small buckets (the embedding, larger than one, in place), with one
    gradient missing on rank 1 only and one missing on both ranks."""
    model = _model()
    opt = misa.MISA(model, lr=1e-2, sampler="full")
    opt.grad_sync.bucket_bytes = 2048
    x = _rows(_global_batch(0), rank)
    with opt.no_sync():
        model(x, labels=x).backward()
    named = dict(model.named_parameters())
    half_missing, missing = "model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight"
    if rank == 1:
        named[half_missing].grad = None
    named[missing].grad = None
    expected = {}
    for name, p in named.items():
        if name != missing:
            local = torch.zeros_like(p) if p.grad is None else p.grad.clone()
            dist.all_reduce(local)
            expected[name] = local / WORLD
    opt.step()  # averages the accumulated gradients first
    return {"buckets": len(opt.grad_sync._buckets([p.grad for p in named.values() if p.grad is not None])),
            "missing_grad": named[missing].grad,
            "max_error": max((named[n].grad - e).abs().max().item() for n, e in expected.items())}


def _scenario_host_syncs(rank, tmp):
    """Calls that would block the host or copy from it, in the steps that do not resample: MISA's
    gradient averaging (counted over backward, where it runs, and step) and FSDP2 (step, with
    its all-reduce of the per-module norms), with clipping and fp32, and bf16 with masters."""
    from sync_counter import count_host_syncs
    result = {}
    for name, build in (("data_parallel", _model), ("fsdp", _sharded_model)):
        for dtype in (torch.float32, torch.bfloat16):
            model = build().to(dtype)
            opt = misa.MISA(model, lr=1e-2, delta=0.15, interval=3, seed=SEED, warmup_sweep=False,
                            max_grad_norm=0.1)
            events = []
            for step in range(8):
                x = _rows(_global_batch(step), rank)
                loss = model(x, labels=x)
                if name == "fsdp":
                    loss.backward()
                with count_host_syncs() as syncs:
                    if name == "data_parallel":
                        loss.backward()
                    opt.step()
                if (step + 1) % 3:  # not a resampling step
                    events += syncs.events
                opt.zero_grad()
            result[f"{name} {dtype}"] = events
    return result


SCENARIOS = {"data_parallel": _scenario_data_parallel, "fsdp": _scenario_fsdp, "desync": _scenario_desync,
             "buckets": _scenario_buckets, "fsdp_mixed_precision": _scenario_fsdp_mixed_precision,
             "ddp_rewrap": _scenario_ddp_rewrap, "host_syncs": _scenario_host_syncs}


def _worker(rank, tmp):
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {}
    try:
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario(rank, tmp)
            except Exception:  # recorded per scenario, so that the other tests still run
                results[name] = {"failure": traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, os.path.join(tmp, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each rank of the two-process job saw, per scenario."""
    tmp = str(tmp_path_factory.mktemp("distributed"))
    context = mp.start_processes(_worker, args=(tmp,), nprocs=WORLD, join=False, start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=400)
    while not context.join(timeout=5):
        if datetime.datetime.now() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two-process job did not finish in 400 s")
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _scenario(ranks, name):
    per_rank = [r[name] for r in ranks]
    for rank, result in enumerate(per_rank):
        assert "failure" not in result, f"rank {rank}, scenario {name}:\n{result['failure']}"
    return per_rank


def _single_process():
    """The reference: one process, the whole global batch at every step."""
    model = _model()
    opt = misa.MISA(model, seed=SEED, **OPTIONS)
    losses, active = [], []
    for step in range(STEPS):
        active.append(list(opt.active_modules))
        x = _global_batch(step)
        loss = model(x, labels=x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "active": active, "params": _full_params(model), "scores": opt.sampler.scores.clone()}


@pytest.fixture(scope="module")
def reference():
    return _single_process()


def _assert_matches_reference(result, reference):
    assert result["active"] == reference["active"]
    assert result["losses"] == pytest.approx(reference["losses"], rel=LOSS_RTOL)
    torch.testing.assert_close(result["scores"], reference["scores"], rtol=SCORE_RTOL, atol=0)
    for name, value in reference["params"].items():
        torch.testing.assert_close(result["params"][name], value, rtol=0, atol=PARAM_ATOL, msg=name)


# ------------------------------------------------------------------ data parallel


def test_data_parallel_matches_one_process(ranks, reference):
    per_rank = _scenario(ranks, "data_parallel")
    assert len({tuple(map(tuple, r["active"])) for r in per_rank}) == 1
    assert len(set(map(tuple, reference["active"]))) > 2, "the run must switch modules to test anything"
    for result in per_rank:
        _assert_matches_reference(result, reference)
    for name, value in per_rank[0]["params"].items():  # the replicas stay bitwise identical
        assert torch.equal(value, per_rank[1]["params"][name]), name


def test_ddp_rewrapped_at_every_switch_matches_one_process(ranks, reference):
    for result in _scenario(ranks, "ddp_rewrap"):
        _assert_matches_reference(result, reference)


def test_rank_zero_seed_is_broadcast(ranks):
    assert [r["seed"] for r in _scenario(ranks, "data_parallel")] == [SEED, SEED]


def test_data_parallel_sends_only_active_gradients(ranks):
    result = _scenario(ranks, "data_parallel")[0]
    assert result["frozen_grads"] == 0
    for step, (sent, active, tensors) in enumerate(zip(result["bytes"], result["active_bytes"], result["tensors"])):
        averages = 1 if step % 2 == 0 else 2  # under no_sync one per step, else one per backward
        # the active gradients and a float32 count per active tensor, nothing for frozen modules
        assert sent == averages * (active + 4 * tensors), f"step {step}"


def test_gradient_buckets_and_missing_gradients(ranks):
    for result in _scenario(ranks, "buckets"):
        assert result["buckets"] > 10
        assert result["max_error"] == 0.0  # the same float32 sum, divided by 2
        assert result["missing_grad"] is None


def test_data_parallel_resume_from_distributed_checkpoint_is_exact(ranks):
    for result in _scenario(ranks, "data_parallel"):
        for name, value in result["params"].items():
            assert torch.equal(result["resumed_params"][name], value), name


# ------------------------------------------------------------------ FSDP2


def test_fsdp2_matches_one_process(ranks, reference):
    per_rank = _scenario(ranks, "fsdp")
    for result in per_rank:
        _assert_matches_reference(result, reference)


def test_fsdp2_state_is_sharded_like_the_parameters(ranks):
    result = _scenario(ranks, "fsdp")[0]
    assert result["state"], "no optimizer state"
    for kind, global_numel, local_numel in result["state"]:
        assert kind == "DTensor"
        assert local_numel == pytest.approx(global_numel / WORLD, abs=CONFIG.hidden_size)


def test_fsdp2_reduces_only_active_gradients(ranks):
    result = _scenario(ranks, "fsdp")[0]
    assert result["grad_numel"] == result["active_numel"]


def test_fsdp2_mixed_precision_trains_modules_of_blocks_frozen_at_the_first_forward(ranks):
    for result in _scenario(ranks, "fsdp_mixed_precision"):
        assert result["dtypes"] == {torch.float32}
        assert result["new_blocks"], "no block was first activated after the first forward"
        assert all(math.isfinite(v) for v in result["losses"])


def test_fsdp2_resume_from_distributed_checkpoint_is_exact(ranks):
    for result in _scenario(ranks, "fsdp"):
        for name, value in result["params"].items():
            assert torch.equal(result["resumed_params"][name], value), name


# ------------------------------------------------------------------ agreement


def test_debug_mode_catches_ranks_that_draw_differently(ranks):
    for result in _scenario(ranks, "desync"):
        assert result["error"] is not None and "ranks disagree on the active modules" in result["error"]


def test_wrapped_models_are_rejected(tmp_path):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(TypeError, match="MISA got a DistributedDataParallel model.*Pass the bare model"):
            misa.MISA(DistributedDataParallel(_model()), lr=1e-2, delta=0.15)
        with pytest.raises(TypeError, match="not the FSDP1 wrapper"):  # FSDP1 cannot be built without a GPU
            misa.MISA(FullyShardedDataParallel.__new__(FullyShardedDataParallel), lr=1e-2, delta=0.15)
        with pytest.raises(ValueError, match="grad_sync=True needs an initialised process group of several ranks"):
            misa.MISA(_model(), lr=1e-2, delta=0.15, grad_sync=True)
    finally:
        dist.destroy_process_group()


def test_switch_hooks_run_after_every_change_of_the_active_set():
    """The hook a DDP re-wrap (or any per-switch work) hangs on: it runs at every resampling
    and after load_state_dict, and sees exactly the new active modules trainable."""
    model = _model()
    opt = misa.MISA(model, lr=1e-2, delta=0.15, interval=2, seed=SEED)  # warm-up sweep: a draw per step
    initial = list(opt.active_modules)
    saved = opt.state_dict()
    seen = []

    def record(optimizer):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        seen.append((optimizer._step_count, list(optimizer.active_modules), trainable))

    handle = opt.register_switch_hook(record)
    for step in range(3):
        x = _global_batch(step)
        model(x, labels=x).backward()
        opt.step()
        opt.zero_grad()
    opt.load_state_dict(saved)
    handle.remove()
    opt.load_state_dict(saved)
    assert [(step, active) for step, active, _ in seen][-1] == (0, initial)
    assert [step for step, _, _ in seen] == [1, 2, 3, 0]
    modules = {m.name: set(m.param_names) for m in opt.partition.modules}
    for _, active, trainable in seen:
        assert trainable == set().union(*(modules[name] for name in active))


# ------------------------------------------------------------------ no host synchronisation


def test_distributed_steps_do_not_synchronise_with_the_host(ranks):
    for rank, result in enumerate(_scenario(ranks, "host_syncs")):
        for path, events in result.items():
            assert not events, f"rank {rank}, {path}: {len(events)} host sync(s):\n  " + "\n  ".join(events)
