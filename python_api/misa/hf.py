"""MISA in the Hugging Face Trainer (the optional ``hf`` extra: transformers, accelerate).

The one-liner::

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizers=misa.hf.optimizers(model, args, delta=0.03, interval=50),
                      callbacks=[misa.hf.MISACallback()])

:func:`optimizers` builds the MISA optimizer from the TrainingArguments (learning rate, Adam
betas and epsilon, weight decay) and lets the Trainer build its learning-rate scheduler over
it. The Trainer's own machinery then works unchanged: it clips the gradients of the active
modules (frozen ones have none) before ``optimizer.step()``, accumulates gradients over
micro-batches, runs bf16 autocast, saves ``optimizer.state_dict()`` in each checkpoint and
loads it on resume (the active set, the scores and the sampler's generator included, so
that a resumed run continues exactly).

Why not the Trainer's default optimizer with a callback that freezes and unfreezes layers,
as LISA-style recipes do: the Trainer builds its optimizer from the parameters that require
grad when training starts, so with the model frozen up front a module unfrozen later gets a
gradient and is never updated (and with nothing frozen up front, AdamW keeps state for every
layer). MISA is built on the model, owns every module it may activate, and creates and frees
state when it switches. :class:`MISACallback` writes the active modules and their sampling probabilities
into the Trainer's logs.

Multi-process Trainer runs are not covered: accelerate wraps the model in
DistributedDataParallel, whose reducer is fixed at wrap time (see :mod:`misa.distributed`).
"""
from __future__ import annotations

from typing import Optional, Tuple

try:
    from transformers import TrainerCallback
except ImportError as error:  # the optional extra is missing: say which
    raise ImportError("misa.hf needs transformers and accelerate: pip install 'misa-kernels[hf]'") from error

from .optimizer import MISA

#: prefix of the keys the callback adds to the Trainer's logs.
LOG_PREFIX = "misa/"


def optimizers(model, args, **misa_options) -> Tuple[MISA, None]:
    """``(MISA optimizer, None)`` for ``Trainer(optimizers=...)``: the optimizer takes the
    learning rate, Adam betas, epsilon and weight decay of `args` (a TrainingArguments) and
    `misa_options` (delta, interval, sampler, ...); None lets the Trainer create the scheduler
    of `args` (lr_scheduler_type, warmup) over it."""
    hyper = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                 weight_decay=args.weight_decay)
    clash = sorted(set(hyper) & set(misa_options))
    if clash:
        raise TypeError(f"{', '.join(clash)} come from the TrainingArguments; set them there")
    return MISA(model, **hyper, **misa_options), None


def unwrap(optimizer) -> Optional[MISA]:
    """The MISA optimizer inside accelerate's AcceleratedOptimizer (or `optimizer` itself),
    None when it is another optimizer."""
    while optimizer is not None and not isinstance(optimizer, MISA):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class MISACallback(TrainerCallback):
    """Adds to every Trainer log: the number of active modules and parameters, their names,
    the norm of the active gradients at the last step and, with `log_importance`, each
    module's sampling probability (``misa/prob/<module>``).

    Checks at the start of training that the Trainer's optimizer is a MISA optimizer, so that
    a run cannot fall back silently to an optimizer blind to the modules MISA unfreezes.
    """

    def __init__(self, log_importance: bool = True):
        self.log_importance = log_importance

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if unwrap(optimizer) is None:
            raise TypeError(f"MISACallback needs a MISA optimizer, the Trainer has {type(optimizer).__name__}: "
                            "pass optimizers=misa.hf.optimizers(model, args, ...) to the Trainer")

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        opt = unwrap(optimizer)
        if opt is None or logs is None:
            return
        entries = {
            f"{LOG_PREFIX}active_modules": len(opt.active_modules),
            f"{LOG_PREFIX}active_params": opt.active_params,
            f"{LOG_PREFIX}active": ",".join(opt.active_modules),
        }
        if opt.last_stats is not None:
            entries[f"{LOG_PREFIX}grad_norm"] = float(opt.last_stats.total_norm)
        if self.log_importance:
            entries.update({f"{LOG_PREFIX}prob/{name}": p for name, p in opt.importance().items()})
        # The Trainer appended {**logs, "step": ...} to log_history just before this event.
        record = state.log_history[-1] if state.log_history else None
        if record is not None and record.get("step") == state.global_step and all(
                record.get(k) == v for k, v in logs.items()):
            record.update(entries)
        logs.update(entries)
