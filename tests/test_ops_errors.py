"""Bad input raises a clear error naming the problem, for every backend, before any kernel runs;
and the torch.library ops pass opcheck (schema, fake kernel, mutation annotations)."""
from __future__ import annotations

import pytest
import torch

import misa_kernels as mk
from conftest import BACKEND_DEVICE


def _adam_args(n=2, size=5, dtype=torch.float32, device="cpu"):
    params = [torch.randn(size, dtype=dtype, device=device) for _ in range(n)]
    return dict(
        params=params,
        grads=[torch.randn_like(p) for p in params],
        exp_avgs=[torch.zeros_like(p, dtype=torch.float32) for p in params],
        exp_avg_sqs=[torch.zeros_like(p, dtype=torch.float32) for p in params],
        steps=torch.zeros(n, device=device),
        module_ids=list(range(n)),
    )


def _call(backend, **overrides):
    args = _adam_args()
    lr = overrides.pop("lr", 0.1)
    args.update(overrides)
    mk.adamw_step_(**args, lr=lr, backend=backend)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
class TestAdamWRejects:
    def test_mismatched_lengths(self, backend, device):
        with pytest.raises(ValueError, match="same length.*grads=1"):
            _call(backend, grads=[torch.randn(5)])

    def test_integer_tensor(self, backend, device):
        with pytest.raises(TypeError, match=r"grads\[1\] has dtype torch.int64"):
            _call(backend, grads=[torch.randn(5), torch.ones(5, dtype=torch.long)])

    def test_sparse_gradient(self, backend, device):
        with pytest.raises(ValueError, match=r"grads\[0\] is torch.sparse_coo"):
            _call(backend, grads=[torch.randn(5).to_sparse(), torch.randn(5)])

    def test_non_contiguous(self, backend, device):
        with pytest.raises(ValueError, match=r"params\[0\].*not contiguous"):
            _call(backend, params=[torch.randn(10)[::2], torch.randn(5)])

    def test_shape_mismatch(self, backend, device):
        with pytest.raises(ValueError, match=r"exp_avgs\[1\] has shape \(4,\)"):
            _call(backend, exp_avgs=[torch.zeros(5), torch.zeros(4)])

    def test_mismatched_devices(self, backend, device):
        with pytest.raises(ValueError, match=r"grads\[0\] is on meta"):
            _call(backend, grads=[torch.randn(5, device="meta"), torch.randn(5)])

    def test_low_precision_moments(self, backend, device):
        with pytest.raises(TypeError, match=r"exp_avg_sqs\[0\] has dtype torch.bfloat16"):
            _call(backend, exp_avg_sqs=[torch.zeros(5, dtype=torch.bfloat16), torch.zeros(5)])

    def test_mixed_param_dtypes(self, backend, device):
        with pytest.raises(TypeError, match="params mixes dtypes"):
            _call(backend, params=[torch.randn(5), torch.randn(5, dtype=torch.bfloat16)])

    def test_module_id_out_of_range(self, backend, device):
        with pytest.raises(ValueError, match=r"module_ids\[1\] = 2 is outside"):
            _call(backend, module_ids=[0, 2])

    @pytest.mark.parametrize("name,value,message", [
        ("lr", -1.0, "Invalid learning rate value: -1.0"),
        ("beta1", 1.0, "Invalid beta1 value: 1.0"),
        ("eps", -1e-8, "Invalid epsilon value"),
        ("weight_decay", -0.1, "Invalid weight_decay value"),
    ])
    def test_bad_hyperparameters(self, backend, device, name, value, message):
        args = _adam_args()
        kwargs = {"lr": 0.1, name: value}
        with pytest.raises(ValueError, match=message):
            mk.adamw_step_(**args, **kwargs, backend=backend)

    def test_master_of_wrong_dtype(self, backend, device):
        args = _adam_args(dtype=torch.bfloat16)
        masters = [torch.zeros(5, dtype=torch.bfloat16) for _ in range(2)]
        with pytest.raises(TypeError, match=r"master_params\[0\] has dtype torch.bfloat16"):
            mk.adamw_step_(**args, lr=0.1, master_params=masters, backend=backend)

    def test_float64_flag_with_float32_weights(self, backend, device):
        with pytest.raises(TypeError, match="found_inf has dtype torch.float64; expected torch.float32"):
            mk.adamw_step_(**_adam_args(), lr=0.1, found_inf=torch.zeros((), dtype=torch.float64), backend=backend)

    def test_clip_coef_not_a_scalar(self, backend, device):
        with pytest.raises(ValueError, match=r"clip_coef must be a 0-dim \(or one-element\) tensor, got shape \(2,\)"):
            mk.adamw_step_(**_adam_args(), lr=0.1, clip_coef=torch.ones(2), backend=backend)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
class TestSqNormsRejects:
    def test_length_mismatch(self, backend, device):
        with pytest.raises(ValueError, match="same length"):
            mk.grad_sq_norms([torch.ones(3)], [0, 1], 2, backend=backend)

    def test_integer_grad(self, backend, device):
        with pytest.raises(TypeError, match=r"grads\[0\] has dtype torch.int32"):
            mk.grad_sq_norms([torch.ones(3, dtype=torch.int32)], [0], 1, backend=backend)

    def test_accum_of_wrong_length(self, backend, device):
        with pytest.raises(ValueError, match=r"accum must have shape \(2,\)"):
            mk.grad_sq_norms([torch.ones(3)], [0], 2, accum=torch.zeros(3), backend=backend)

    def test_unknown_rule(self, backend, device):
        with pytest.raises(ValueError, match="unknown accum_rule 'l1'"):
            mk.grad_sq_norms([torch.ones(3)], [0], 1, accum_rule="l1", backend=backend)

    def test_bad_max_norm(self, backend, device):
        with pytest.raises(ValueError, match="Invalid max_norm value: 0.0"):
            mk.grad_sq_norms([torch.ones(3)], [0], 1, max_norm=0.0, backend=backend)


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'fast'.*torch"):
        mk.grad_sq_norms([torch.ones(3)], [0], 1, backend="fast")


def test_explicit_unavailable_backend_raises():
    unavailable = [n for n in mk.backends.names() if n not in mk.available_backends("cpu")]
    for name in unavailable:
        with pytest.raises(mk.BackendUnavailable, match=name):
            mk.grad_sq_norms([torch.ones(3)], [0], 1, backend=name)


def test_float64_needs_the_reference_backend():
    others = [n for n in mk.available_backends("cpu") if n != "torch"]
    for name in others:
        with pytest.raises(TypeError, match="does not support params of dtype torch.float64"):
            mk.adamw_step_(**_adam_args(dtype=torch.float64) | {
                "exp_avgs": [torch.zeros(5, dtype=torch.float64) for _ in range(2)],
                "exp_avg_sqs": [torch.zeros(5, dtype=torch.float64) for _ in range(2)]}, lr=0.1, backend=name)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_library_ops_pass_opcheck(backend, device):
    grads = [torch.randn(7, device=device), torch.randn(3, 5, device=device)]
    accum = torch.zeros(2, device=device)
    count = torch.zeros(2, device=device)
    torch.library.opcheck(
        torch.ops.misa_kernels.grad_sq_norms.default,
        (grads, [1, 0], 2, device, 1.0, accum, count, None, "sq", backend),
        test_utils=("test_schema", "test_faketensor"),
    )
    args = _adam_args(device=device)
    torch.library.opcheck(
        torch.ops.misa_kernels.adamw_step_.default,
        (args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"], args["steps"],
         args["module_ids"], 0.1, None, 0.9, 0.999, 1e-8, 0.01, False, None, None, None, None, backend),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_auto_resolves_to_a_backend_that_runs_here():
    name = mk.resolve_backend("auto", "cpu")
    assert name in mk.available_backends("cpu")
