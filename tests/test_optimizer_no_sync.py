"""No host synchronisation in the optimizer's steps between resamplings, on every step path and
backend (issue 12): calls that would block the host or copy Python data to the device are
counted (tests/sync_counter.py) in every step that does not resample, the first step after a
switch included (it creates the new modules' state). The distributed paths are counted in
test_distributed.py. What the counter does not see (an asynchronous copy of a work table from
pinned memory) is in its docstring."""
from __future__ import annotations

import pytest
import torch

import misa
from misa_examples import models
from conftest import BACKEND_DEVICE
from sync_counter import count_host_syncs
from test_optimizer import _train

CONFIG = models.LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                            num_attention_heads=2, num_key_value_heads=2)
INTERVAL = 3

PATHS = {
    "default": dict(dtype=torch.float32, options={}),
    "fused": dict(dtype=torch.float32, options=dict(skip_nonfinite=False)),
    "clip": dict(dtype=torch.float32, options=dict(max_grad_norm=0.5)),
    "bf16 masters, clip": dict(dtype=torch.bfloat16, options=dict(max_grad_norm=0.5)),
    "bf16 masters, fused": dict(dtype=torch.bfloat16, options=dict(skip_nonfinite=False)),
    "mixed dtypes": dict(dtype="mixed", options=dict(max_grad_norm=0.5)),
    "grad scaler": dict(dtype=torch.float16, options={}, scaler=True),
}


def _model(dtype, device):
    torch.manual_seed(0)
    model = models.build(CONFIG, device)
    if dtype != "mixed":
        return model.to(dtype)
    # attention in bf16, the rest fp32 (casts around it): the norms see two gradient dtypes
    for layer in model.model.layers:
        layer.self_attn.to(torch.bfloat16)
        layer.self_attn.register_forward_pre_hook(
            lambda m, args, kwargs: (tuple(a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a
                                           for a in args), kwargs), with_kwargs=True)
        layer.self_attn.register_forward_hook(lambda m, args, out: out.float())
    return model


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("path", list(PATHS))
def test_steps_between_resamplings_do_not_synchronise(path, backend, device):
    spec = PATHS[path]
    model = _model(spec["dtype"], device)
    opt = misa.MISA(model, lr=1e-3, delta=0.2, interval=INTERVAL, seed=0, warmup_sweep=False, backend=backend,
                    **spec["options"])
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 8) if spec.get("scaler") else None
    step_impl = opt._step
    counted = []

    def counting_step(closure):
        with count_host_syncs() as syncs:
            result = step_impl(closure)
        if opt._step_count % INTERVAL:  # this step did not resample
            counted.append(syncs)
        return result

    opt._step = counting_step
    _train(model, opt, 2 * INTERVAL + 2, scaler=scaler)
    assert len(counted) == 2 * INTERVAL
    events = [e for syncs in counted for e in syncs.events]
    assert not events, f"{len(events)} host sync(s):\n  " + "\n  ".join(events)
