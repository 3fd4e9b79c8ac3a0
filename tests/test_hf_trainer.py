"""MISA inside the Hugging Face Trainer: a tiny random-init transformers LLaMA on the CPU.

Covers the modules activated after the start (the trap of an optimizer built from the
parameters trainable at the start), the logs, exact resume from a Trainer checkpoint,
gradient accumulation and the Trainer's gradient clipping, and bf16 autocast.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import misa  # noqa: E402
import misa.hf  # noqa: E402

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=64)
MISA_OPTIONS = dict(delta=0.1, interval=2, seed=3)


def _model(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))


def _data(rows=64, length=16):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CONFIG["vocab_size"], (rows, length), generator=g)
    return [{"input_ids": x, "labels": x} for x in tokens]


def _args(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=1e-2,
                   logging_steps=2, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                   disable_tqdm=True, max_grad_norm=1.0, lr_scheduler_type="constant")
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def _train(tmp_path, model=None, misa_options=None, resume=None, **overrides):
    model = _model() if model is None else model
    args = _args(tmp_path, **overrides)
    optimizers = misa.hf.optimizers(model, args, **{**MISA_OPTIONS, **(misa_options or {})})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(), optimizers=optimizers,
                                   callbacks=[misa.hf.MISACallback()])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


class _ActiveSets(transformers.TrainerCallback):
    """Records the modules active at each optimizer step."""

    def __init__(self):
        self.per_step = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.per_step.append(set(misa.hf.unwrap(optimizer).active_modules))


@pytest.fixture(scope="module")
def misa_run(tmp_path_factory):
    model = _model()
    before = _params(model)
    args = _args(tmp_path_factory.mktemp("run"))
    recorder = _ActiveSets()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(),
                                   optimizers=misa.hf.optimizers(model, args, **MISA_OPTIONS),
                                   callbacks=[misa.hf.MISACallback(), recorder])
    trainer.train()
    return trainer, before, recorder.per_step


def test_modules_activated_after_the_start_are_trained(misa_run):
    trainer, before, per_step = misa_run
    opt = misa.hf.unwrap(trainer.optimizer)
    changed = _changed(before, trainer.model)
    ever = set().union(*per_step)
    later = ever - per_step[0]
    assert later, "no module was activated after the first step"
    for module in opt.partition.modules:
        touched = set(module.param_names) & changed
        if module.name in ever:
            assert touched == set(module.param_names), f"{module.name} was active but not updated"
        else:
            assert not touched, f"{module.name} was never active but changed"
    assert not any(name in changed for name, _ in opt.partition.non_block)  # frozen by default


def test_the_trainers_own_optimizer_misses_modules_unfrozen_later(tmp_path):
    """The trap the test above guards against: the Trainer's default AdamW, built from the
    parameters trainable at the start, never updates a layer a callback unfreezes later."""

    class SwitchLayer(transformers.TrainerCallback):
        layer1_had_grads = False

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            for i, layer in enumerate(model.model.layers):
                layer.requires_grad_(i == (0 if state.global_step < 4 else 1))

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.layer1_had_grads |= all(p.grad is not None for p in model.model.layers[1].parameters())

    model = _model()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers.0."))
    before = _params(model)
    switch = SwitchLayer()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_data(), callbacks=[switch])
    trainer.train()
    changed = _changed(before, model)
    assert switch.layer1_had_grads
    assert any(n.startswith("model.layers.0.") for n in changed)
    assert not any(n.startswith("model.layers.1.") for n in changed)


def test_logs_carry_a_few_numbers_with_distinct_names(misa_run):
    trainer = misa_run[0]
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert len(records) == 4
    opt = misa.hf.unwrap(trainer.optimizer)
    for record in records:
        ours = {k: v for k, v in record.items() if k.startswith("misa/")}
        assert set(ours) == {"misa/active_modules", "misa/active_params", "misa/coverage",
                             "misa/grad_norm_unclipped", "misa/grad_norm_clipped"}
        assert all(isinstance(v, (int, float)) for v in ours.values())  # no strings: trackers drop them
        assert 0 < record["misa/active_modules"] <= len(opt.partition.modules)
        assert 0 < record["misa/coverage"] <= 1
        # the Trainer logs the norm before its clipping (threshold 1.0), MISA what it received after it
        assert record["misa/grad_norm_unclipped"] == pytest.approx(min(record["grad_norm"], 1.0), rel=1e-4)
        assert record["misa/grad_norm_clipped"] == pytest.approx(record["misa/grad_norm_unclipped"])
    assert records[-1]["misa/coverage"] == pytest.approx(opt.coverage().fraction)
    assert records[-1]["misa/coverage"] > records[0]["misa/coverage"]


def test_per_module_probabilities_only_on_request(tmp_path):
    model = _model()
    args = _args(tmp_path, max_steps=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(),
                                   optimizers=misa.hf.optimizers(model, args, **MISA_OPTIONS),
                                   callbacks=[misa.hf.MISACallback(log_importance=True)])
    trainer.train()
    record = next(r for r in trainer.state.log_history if "loss" in r)
    opt = misa.hf.unwrap(trainer.optimizer)
    probs = {k[len("misa/prob/"):]: v for k, v in record.items() if k.startswith("misa/prob/")}
    assert probs == opt.importance() and sum(probs.values()) == pytest.approx(1.0)


def test_optimizers_use_the_trainers_weight_decay_grouping(tmp_path):
    model = _model()
    opt, _ = misa.hf.optimizers(model, _args(tmp_path, weight_decay=0.1), **MISA_OPTIONS)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert decayed == set(transformers.Trainer.get_decay_parameter_names(None, model))
    assert not any("norm" in n for n in decayed)


def test_resume_from_a_trainer_checkpoint_continues_exactly(tmp_path):
    full = _train(tmp_path / "full", save_strategy="steps", save_steps=4)
    resumed = _train(tmp_path / "resumed", model=_model(seed=7), resume=str(tmp_path / "full" / "checkpoint-4"),
                     save_strategy="steps", save_steps=4)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    opt, resumed_opt = misa.hf.unwrap(full.optimizer), misa.hf.unwrap(resumed.optimizer)
    assert resumed_opt.active_modules == opt.active_modules
    assert torch.equal(resumed_opt.sampler.scores, opt.sampler.scores)
    losses = [(r["step"], r["loss"]) for r in full.state.log_history if "loss" in r]
    resumed_losses = [(r["step"], r["loss"]) for r in resumed.state.log_history if "loss" in r]
    assert resumed_losses == losses and len(losses) == 4  # steps 2, 4 from the checkpoint, 6, 8 recomputed


def test_accumulation_and_clipping_match_one_large_batch(tmp_path):
    """Two micro-batches of 2 with the Trainer's clipping == one batch of 4 with MISA's own
    clipping (max_grad_norm=0.02 clips every step here), up to float32 rounding, which Adam
    magnifies in tiny gradients: measured 9e-5 for the accumulation, 5e-5 for the clipping
    path, against 2e-2 between clipped and unclipped runs (one step moves a weight by 1e-2)."""
    accumulated = _train(tmp_path / "a", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         max_grad_norm=0.02)
    clipped_by_misa = _train(tmp_path / "b", max_grad_norm=0.0, misa_options={"max_grad_norm": 0.02})
    unclipped = _train(tmp_path / "c", max_grad_norm=0.0)
    opt = misa.hf.unwrap(clipped_by_misa.optimizer)
    assert opt.last_stats.clip_coef.item() < 1.0
    worst_same, worst_other = 0.0, 0.0
    for a, b, c in zip(accumulated.model.parameters(), clipped_by_misa.model.parameters(),
                       unclipped.model.parameters()):
        worst_same = max(worst_same, (a - b).abs().max().item())
        worst_other = max(worst_other, (a - c).abs().max().item())
    assert worst_same < 1e-3
    assert worst_other > 1e-2


def test_bf16_autocast_trains(tmp_path, misa_run):
    fp32 = misa_run[0]
    bf16 = _train(tmp_path, bf16=True)
    losses = [[r["loss"] for r in t.state.log_history if "loss" in r] for t in (fp32, bf16)]
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)  # bf16 matmuls: about 3 significant digits
    assert misa.hf.unwrap(bf16.optimizer).active_modules == misa.hf.unwrap(fp32.optimizer).active_modules


def test_helpers_reject_misuse():
    model = _model()
    args = _args("unused")
    with pytest.raises(TypeError, match="lr come from the TrainingArguments"):
        misa.hf.optimizers(model, args, lr=1e-3)
    with pytest.raises(TypeError, match="MISACallback needs a MISA optimizer, the Trainer has AdamW"):
        misa.hf.MISACallback().on_train_begin(args, None, None, optimizer=torch.optim.AdamW(model.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_optimizers_built_before_the_trainer_moves_the_model_follow_it(tmp_path):
    model = _model()  # on the CPU: the Trainer moves it to the GPU in train()
    args = _args(tmp_path, use_cpu=False, max_steps=4)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(),
                                   optimizers=misa.hf.optimizers(model, args, **MISA_OPTIONS),
                                   callbacks=[misa.hf.MISACallback()])
    trainer.train()
    opt = misa.hf.unwrap(trainer.optimizer)
    assert opt.device.type == "cuda" and opt.sampler.scores.device.type == "cuda"
    assert opt.state and all(t.device.type == "cuda" for s in opt.state.values() for t in s.values())
