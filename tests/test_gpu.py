"""GPU-only goals, checked where a CUDA device exists (skipped otherwise): no host
synchronisation in a non-resampling step, the launch count of the fused step, and a float64 lr
tensor read by the kernels as it is (no conversion launch)."""
from __future__ import annotations

import pytest
import torch

import misa
import misa_kernels as mk
from misa_examples import models

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available() and b in mk.available_backends("cuda")]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_resampling_step_never_synchronises(backend):
    config = models.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3)
    model = models.build(config, "cuda", torch.bfloat16)
    opt = misa.MISA(model, lr=1e-3, delta=0.2, interval=1000, warmup_sweep=False, max_grad_norm=1.0,
                    backend=backend, seed=0)
    x = torch.randint(0, config.vocab_size, (2, 16), device="cuda")
    model(x, labels=x).backward()
    opt.step()  # first call: compilation, pinned buffers
    model(x, labels=x).backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fused_step_launch_count_does_not_grow_with_tensors(backend):
    def launches(n):
        params = [torch.randn(1000 + i, device="cuda") for i in range(n)]
        grads = [torch.randn_like(p) for p in params]
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        steps = torch.zeros(n, device="cuda")
        ids = list(range(n))

        def step():
            stats = mk.grad_sq_norms(grads, ids, n, max_norm=1.0, backend=backend)
            mk.adamw_step_(params, grads, m, v, steps, ids, lr=1e-3, clip_coef=stats.clip_coef,
                           found_inf=stats.found_inf, backend=backend)

        step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith("Memcpy"))

    small, large = launches(7), launches(224)
    assert small == large
    assert large <= (3 if backend == "cuda" else 4), f"{large} launches per step"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_float64_lr_tensor_costs_no_extra_launch(backend):
    params = [torch.randn(1000 + i, device="cuda") for i in range(5)]
    grads = [torch.randn_like(p) for p in params]
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = torch.zeros(5, device="cuda")

    def launches(lr):
        def step():
            mk.adamw_step_(params, grads, *state, steps, list(range(5)), lr=lr, backend=backend)

        step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)

    assert launches(torch.tensor(1e-3, dtype=torch.float64, device="cuda")) == launches(1e-3)
