"""Checks specific to the triton backend: the work table, aligned and unaligned tensors, several
chunks per tensor, exact rounding of the written-back weights, the skip flag with fused norms,
step counts far from the first steps, and the number of launches per op.

The ops run wherever the backend does: on CUDA, or on CPU tensors under TRITON_INTERPRET=1.
Small chunks (`chunk_size=48`, so a block of 32 and a tail of 16) give every tensor several
chunks with both the whole-block and the masked-tail paths, at a few programs per call.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import misa_kernels as mk

pytest.importorskip("triton")
from misa_kernels.backends.triton import adamw, sq_norms, work_table  # noqa: E402  (needs triton)

# the interpreter turns a one-element array into a loop bound through a deprecated numpy path
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICES = [
    pytest.param(d, marks=[pytest.mark.gpu] if d == "cuda" else [])
    for d in ("cpu", "cuda")
    if (d == "cpu" or torch.cuda.is_available()) and "triton" in mk.available_backends(d)
]
SMALL_CHUNK = 48
SIZES = [1, 47, 48, 49, 200, 0, 129]
MODULE_IDS = [3, 0, 3, 1, 0, 2, 1]
NUM_MODULES = 5  # module 2 holds only an empty tensor, module 4 nothing


def _tensors(sizes, device, dtype=torch.float32, unaligned=False):
    """Random tensors, separately allocated or carved at odd element offsets from one buffer."""
    if not unaligned:
        return [torch.randn(n).to(dtype).to(device) for n in sizes]
    flat = torch.randn(sum(sizes) + 2 * len(sizes) + 1).to(dtype).to(device)
    out, at = [], 1
    for n in sizes:
        out.append(flat[at:at + n])
        at += n + 2
    return out


# ----------------------------------------------------------------------------- the work table


def test_table_layout_offsets_and_module_runs():
    grads = [torch.randn(n) for n in (5, 0, 40, 17)]
    work = work_table.build({"grads": grads}, [2, 0, 2, 1], 4, torch.device("cpu"), chunk_size=16)
    table = work.table
    chunks_at = work_table.HEADER_SLOTS
    tensors_at = chunks_at + 3 * 6
    module_begin_at = tensors_at + 2 * 4
    presence_at = module_begin_at + 4 + 1
    assert table[:work_table.HEADER_SLOTS].tolist() == [4, 6, module_begin_at, presence_at]
    assert table.numel() == presence_at + 4
    # chunks sorted by module, then tensor: module 1 (tensor 3), then module 2 (tensors 0, 2)
    assert work.num_chunks == 6
    rows = table[chunks_at:tensors_at].view(6, 3)
    assert ((rows[:, 0] - tensors_at) // 2).tolist() == [3, 3, 0, 2, 2, 2]
    assert rows[:, 1].tolist() == [0, 16, 0, 0, 16, 32]
    assert rows[:, 2].tolist() == [16, 1, 5, 16, 16, 8]
    tensor_rows = table[tensors_at:module_begin_at].view(4, 2)
    assert tensor_rows[:, 0].tolist() == [2, 0, 2, 1]
    (base,) = work.bases([grads])
    assert base.data_ptr() == min(g.data_ptr() for g in grads if g.numel())
    for i in (0, 2, 3):
        assert base.data_ptr() + 4 * int(tensor_rows[i, 1]) == grads[i].data_ptr()
    # every module's run of chunks (module 0 holds only the empty tensor, module 3 nothing)
    assert table[module_begin_at:presence_at].tolist() == [0, 0, 2, 6, 6]
    assert table[presence_at:].tolist() == [1, 1, 1, 0]


def test_float_arguments_carry_float64_exactly():
    for value in (0.0, -0.0, 1e-3, 0.999, -1e-300, 5e-324, 1e300, -math.inf, math.inf):
        bits = work_table.float_bits(value)
        back = torch.tensor([bits], dtype=torch.int64).view(torch.float64).item()
        assert back == value and math.copysign(1.0, back) == math.copysign(1.0, value)


def test_table_alignment_flag_and_empty_lists():
    aligned = work_table.build({"g": [torch.randn(7), torch.randn(9)]}, [0, 0], 1, torch.device("cpu"), 16)
    assert aligned.aligned
    flat = torch.randn(40)
    unaligned = work_table.build({"g": [flat[:8], flat[9:20]]}, [0, 0], 1, torch.device("cpu"), 16)
    assert not unaligned.aligned
    empty = work_table.build({"g": []}, [], 3, torch.device("cpu"), 16)
    assert empty.num_chunks == 0 and empty.base_index == (None,)
    assert empty.table[work_table.NUM_CHUNKS_SLOT].item() == 0


def test_table_rejects_tensors_not_aligned_to_their_element_size():
    raw = bytearray(64)
    odd = torch.frombuffer(raw, dtype=torch.float32, count=4, offset=1)
    even = torch.frombuffer(raw, dtype=torch.float32, count=4, offset=32)
    with pytest.raises(ValueError, match=r"g\[1\] starts 31 bytes after g\[0\]"):
        work_table.build({"g": [odd, even]}, [0, 0], 1, torch.device("cpu"), 16)


def test_chunk_size_must_keep_vector_alignment():
    with pytest.raises(ValueError, match="multiple of 16, got 40"):
        work_table.launch_config(torch.device("cpu"), 40)


def test_import_is_lazy():
    code = ("import sys, misa_kernels; "
            "assert not [m for m in sys.modules if m.startswith('misa_kernels.backends.triton.')]")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- grad_sq_norms


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unaligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sq_norms_several_chunks_per_tensor(device, unaligned, dtype):
    grads = _tensors(SIZES, device, dtype, unaligned)
    accum = torch.rand(NUM_MODULES, device=device)
    count = torch.zeros(NUM_MODULES, device=device)
    accum_ref, count_ref = accum.cpu().clone(), count.cpu().clone()
    got = sq_norms.grad_sq_norms(grads, MODULE_IDS, NUM_MODULES, torch.device(device), 0.5, accum, count,
                                 None, "clipped_norm", chunk_size=SMALL_CHUNK)
    ref = mk.grad_sq_norms([g.cpu().double() for g in grads], MODULE_IDS, NUM_MODULES, max_norm=0.5,
                           accum=accum_ref, accum_count=count_ref, accum_rule="clipped_norm", backend="torch")
    for name, a, b in zip(("module_sq_norms", "total_norm", "clip_coef"), got, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=2e-6, atol=0, msg=name)
    assert got[0][2].item() == 0.0 and got[0][4].item() == 0.0 and got[3].item() == 0.0
    torch.testing.assert_close(accum.cpu(), accum_ref, rtol=2e-6, atol=0)
    assert count.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- adamw_step_


def _adam_inputs(device, unaligned=False, master=False, dtype=torch.float32):
    params = _tensors(SIZES, device, dtype, unaligned)
    exp_avgs = _tensors(SIZES, device, torch.float32, unaligned)
    exp_avg_sqs = _tensors(SIZES, device, torch.float32, unaligned)
    for m, v in zip(exp_avgs, exp_avg_sqs):  # in place: views stay views
        m.mul_(0.1)
        v.square_().mul_(0.01)
    return {
        "params": params,
        "grads": _tensors(SIZES, device, dtype, unaligned),
        "exp_avgs": exp_avgs,
        "exp_avg_sqs": exp_avg_sqs,
        "master_params": [p.float() + 1e-3 for p in params] if master else None,
    }


def _clone(inputs):
    return {k: None if v is None else [t.clone() for t in v] for k, v in inputs.items()}


def _assert_close_lists(got, want, **tol):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, msg=f"tensor {i}", **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unaligned", [False, True])
@pytest.mark.parametrize("master", [False, True])
def test_adamw_several_chunks_per_tensor(device, unaligned, master):
    dtype = torch.bfloat16 if master else torch.float32
    inputs = _adam_inputs(device, unaligned, master, dtype)
    ref = _clone(inputs)
    steps = torch.tensor([0.0, 3.0, 7.0, 1.0, 5.0], device=device)
    steps_ref = steps.clone()
    sq_out = torch.full((NUM_MODULES,), -1.0, dtype=torch.float64, device=device)
    sq_ref = sq_out.clone()
    common = dict(lr=torch.tensor(1e-2, device=device), beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                  maximize=False, clip_coef=torch.tensor(0.7, device=device), found_inf=None)
    adamw.adamw_step_(inputs["params"], inputs["grads"], inputs["exp_avgs"], inputs["exp_avg_sqs"], steps,
                      MODULE_IDS, master_params=inputs["master_params"], sq_norms_out=sq_out,
                      chunk_size=SMALL_CHUNK, **common)
    mk.adamw_step_(ref["params"], ref["grads"], ref["exp_avgs"], ref["exp_avg_sqs"], steps_ref, MODULE_IDS,
                   master_params=ref["master_params"], sq_norms_out=sq_ref, backend="torch", **common)
    _assert_close_lists(inputs["exp_avgs"], ref["exp_avgs"], rtol=1e-6, atol=1e-8)
    _assert_close_lists(inputs["exp_avg_sqs"], ref["exp_avg_sqs"], rtol=1e-6, atol=1e-9)
    if master:
        _assert_close_lists(inputs["master_params"], ref["master_params"], rtol=1e-6, atol=1e-7)
        for p, w in zip(inputs["params"], inputs["master_params"]):
            assert torch.equal(p, w.to(dtype))
    else:
        _assert_close_lists(inputs["params"], ref["params"], rtol=1e-6, atol=1e-7)
    assert steps.tolist() == [1.0, 4.0, 8.0, 2.0, 5.0]
    torch.testing.assert_close(sq_out, sq_ref, rtol=2e-6, atol=0)
    assert sq_out[4].item() == 0.0 and sq_out[2].item() == 0.0


def _float32(bits):
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


#: float32 values at and around the rounding boundaries of bfloat16 and float16: exact ties
#: (to even up and down), just above and below a tie, overflow to inf, subnormals, signed zero.
ROUNDING_CASES = _float32([
    0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF818000, 0x7F7FFFFF, 0x7F7F8000, 0xFF7F8000,
    0x00008000, 0x00018000, 0x80000000, 0x00000001, 0x7F800000, 0xFF800000, 0x477FF000, 0x477FEFFF,
    0x33000000, 0x33000001, 0x387FC000, 0x38800000, 0x3DCCCCCD, 0xC2C80000,
])


@pytest.fixture
def ieee_subnormals():
    """Turns flush-to-zero off for the test (torch's own rounding is the expected value, and it
    must see subnormals), then restores what it found: a benchmark run in-process turns it on."""
    flushing = torch.tensor([1e-40]).mul(1.0).item() == 0.0
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(flushing)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # inf, on purpose
def test_write_back_rounds_to_nearest_even_bitwise(device, dtype, ieee_subnormals):
    master = torch.cat([ROUNDING_CASES, torch.randn(3000) * 10.0 ** torch.randint(-6, 6, (3000,))]).to(device)
    expected = master.to(dtype)
    params = [torch.zeros_like(master, dtype=dtype)]
    zeros = [torch.zeros_like(master)]
    masters = [master.clone()]
    # lr = 0 leaves the master as it is, so the weight must be exactly the master rounded
    mk.adamw_step_(params, [torch.zeros_like(params[0])], zeros, [z.clone() for z in zeros],
                   torch.zeros(1, device=device), [0], lr=0.0, master_params=masters, backend="triton")
    assert torch.equal(masters[0], master)
    assert torch.equal(params[0].view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("device", DEVICES)
def test_skipped_step_still_writes_fused_norms(device):
    inputs = _adam_inputs(device)
    before = _clone(inputs)
    steps = torch.tensor([2.0, 0.0, 1.0, 9.0, 4.0], device=device)
    sq_out = torch.full((NUM_MODULES,), 5.0, dtype=torch.float64, device=device)
    adamw.adamw_step_(inputs["params"], inputs["grads"], inputs["exp_avgs"], inputs["exp_avg_sqs"], steps,
                      MODULE_IDS, 0.1, 0.9, 0.999, 1e-8, 0.1, False, None, torch.tensor(0.5, device=device),
                      torch.tensor(1.0, device=device), sq_out, chunk_size=SMALL_CHUNK)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        assert all(torch.equal(a, b) for a, b in zip(inputs[key], before[key])), key
    assert steps.tolist() == [2.0, 0.0, 1.0, 9.0, 4.0]
    ref = mk.grad_sq_norms([g.cpu().double() for g in inputs["grads"]], MODULE_IDS, NUM_MODULES, backend="torch")
    torch.testing.assert_close(sq_out.cpu(), ref.module_sq_norms, rtol=2e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_far_and_fractional_steps(device):
    sizes = [33, 65, 7, 20, 9]
    params = [torch.randn(n, device=device) for n in sizes]
    grads = [torch.randn(n, device=device) for n in sizes]
    state = [[torch.rand(n, device=device) * 0.1 for n in sizes], [torch.rand(n, device=device) * 0.01 for n in sizes]]
    steps = torch.tensor([0.0, 1.0, 999.0, 123456.0, 2.5], device=device)
    sq_out = torch.zeros(5, dtype=torch.float64, device=device)
    runs = []
    for backend in ("triton", "torch"):
        p, m, v, s, out = [t.clone() for t in params], [t.clone() for t in state[0]], \
            [t.clone() for t in state[1]], steps.clone(), sq_out.clone()
        mk.adamw_step_(p, grads, m, v, s, list(range(5)), lr=1e-3, beta1=0.8, beta2=0.999,
                       sq_norms_out=out, backend=backend)
        runs.append((p, m, v, s, out))
    (p, m, v, s, out), (p_ref, m_ref, v_ref, s_ref, out_ref) = runs
    _assert_close_lists(p, p_ref, rtol=1e-6, atol=1e-7)
    _assert_close_lists(m, m_ref, rtol=1e-6, atol=1e-8)
    _assert_close_lists(v, v_ref, rtol=1e-6, atol=1e-9)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(out, out_ref, rtol=2e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_lr_tensor_and_float_give_the_same_update(device):
    results = []
    for lr in (0.5, torch.tensor(0.5, device=device)):
        torch.manual_seed(0)
        inputs = _adam_inputs(device)
        mk.adamw_step_(inputs["params"], inputs["grads"], inputs["exp_avgs"], inputs["exp_avg_sqs"],
                       torch.ones(NUM_MODULES, device=device), MODULE_IDS, lr=lr, weight_decay=0.01,
                       backend="triton")
        results.append(inputs["params"])
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ----------------------------------------------------------------------------- launches


@pytest.mark.parametrize("device", DEVICES)
def test_two_launches_per_op(device, monkeypatch):
    launches = []
    kernels = {"sq_chunks": sq_norms._chunk_sq_sums_kernel, "sq_finalize": sq_norms._finalize_kernel,
               "adamw_chunks": adamw._adamw_chunk_kernel, "adamw_finalize": adamw._finalize_kernel}

    def counted(name, run):
        def wrapper(*args, **kwargs):
            launches.append(name)
            return run(*args, **kwargs)
        return wrapper

    for name, kernel in kernels.items():
        monkeypatch.setattr(kernel, "run", counted(name, kernel.run))
    grads = _tensors([5, 70], device)
    mk.grad_sq_norms(grads, [0, 1], 2, max_norm=1.0, backend="triton")
    assert launches == ["sq_chunks", "sq_finalize"]
    launches.clear()
    params = _tensors([5, 70], device)
    mk.adamw_step_(params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                   torch.zeros(2, device=device), [0, 1], lr=0.1,
                   sq_norms_out=torch.zeros(2, dtype=torch.float64, device=device),
                   found_inf=torch.zeros((), device=device), backend="triton")
    assert launches == ["adamw_chunks", "adamw_finalize"]
    launches.clear()
    mk.grad_sq_norms([torch.empty(0, device=device)], [0], 1, backend="triton")
    assert launches == ["sq_finalize"]  # no element to read: only the finalize
