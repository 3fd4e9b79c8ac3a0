"""MISA in the Hugging Face Trainer (the optional ``hf`` extra: transformers, accelerate).

The one-liner::

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizers=misa.hf.optimizers(model, args, delta=0.03, interval=50),
                      callbacks=[misa.hf.MISACallback()])

:func:`optimizers` builds the MISA optimizer from the TrainingArguments (learning rate, Adam
betas and epsilon, weight decay on the parameters the Trainer itself would decay: not biases
and norms) and lets the Trainer build its learning-rate scheduler over it. The optimizer may be
built before the Trainer moves the model to its device: moments, masters, step counts and
scores are created on, or follow, the device the parameters are on at each step. The Trainer's own machinery then works unchanged: it clips the gradients of the active
modules (frozen ones have none) before ``optimizer.step()``, accumulates gradients over
micro-batches, runs bf16 autocast, saves ``optimizer.state_dict()`` in each checkpoint and
loads it on resume (the active set, the scores and the sampler's generator included, so
that a resumed run continues exactly).

Why not the Trainer's default optimizer with a callback that freezes and unfreezes layers,
as LISA-style recipes do: the Trainer builds its optimizer from the parameters that require
grad when training starts, so with the model frozen up front a module unfrozen later gets a
gradient and is never updated (and with nothing frozen up front, AdamW keeps state for every
layer). MISA is built on the model, owns every module it may activate, and creates and frees
state when it switches. :class:`MISACallback` adds a few numbers to the Trainer's logs.

Multi-process Trainer runs are not covered: accelerate wraps the model in
DistributedDataParallel, whose reducer is fixed at wrap time (see :mod:`misa.distributed`).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

try:
    from transformers import TrainerCallback
except ImportError as error:  # the optional extra is missing: say which
    raise ImportError("misa.hf needs transformers and accelerate: pip install 'misa-kernels[hf]'") from error

from torch import nn

from .optimizer import MISA
from .partition import is_trainable

#: prefix of the keys the callback adds to the Trainer's logs.
LOG_PREFIX = "misa/"


def optimizers(model, args, **misa_options) -> Tuple[MISA, None]:
    """``(MISA optimizer, None)`` for ``Trainer(optimizers=...)``: the optimizer takes the
    learning rate, Adam betas, epsilon and weight decay of `args` (a TrainingArguments) and
    `misa_options` (delta, interval, sampler, ...); None lets the Trainer create the scheduler
    of `args` (lr_scheduler_type, warmup) over it."""
    hyper = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                 weight_decay=args.weight_decay)
    clash = sorted(set(hyper) & set(misa_options) | ({"param_groups"} & set(misa_options)))
    if clash:
        raise TypeError(f"{', '.join(clash)} come from the TrainingArguments; set them there")
    groups = trainer_param_groups(model, args.weight_decay)
    return MISA(model, **hyper, param_groups=groups, **misa_options), None


def trainer_param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """The Trainer's own grouping of the trainable parameters: `weight_decay` for those its
    ``get_decay_parameter_names`` names (not biases, not norms), 0 for the rest."""
    from transformers import Trainer

    decay_names = set(Trainer.get_decay_parameter_names(None, model))  # the method reads no Trainer state
    trainable = [(n, p) for n, p in model.named_parameters() if is_trainable(p)]
    groups = [{"params": [p for n, p in trainable if n in decay_names], "weight_decay": weight_decay},
              {"params": [p for n, p in trainable if n not in decay_names], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def unwrap(optimizer) -> Optional[MISA]:
    """The MISA optimizer inside accelerate's AcceleratedOptimizer (or `optimizer` itself),
    None when it is another optimizer."""
    while optimizer is not None and not isinstance(optimizer, MISA):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class MISACallback(TrainerCallback):
    """Adds numbers to every Trainer log (every value a float or int, as MLflow, ClearML and
    DVCLive require):

    - ``misa/active_modules``, ``misa/active_params``: the active set's size;
    - ``misa/coverage``: the fraction of trainable parameters trained so far (see
      :meth:`misa.MISA.coverage`);
    - ``misa/grad_norm_unclipped``, ``misa/grad_norm_clipped``: the norm of the gradients the
      last optimizer step received, and of what it applied after MISA's own ``max_grad_norm``
      clipping. The Trainer clips first (``max_grad_norm`` of the TrainingArguments) and logs its
      ``grad_norm`` before that clipping, so with the Trainer clipping these two are at most
      the Trainer's clip threshold;
    - with `log_importance`, each module's sampling probability (``misa/prob/<module>``: one
      key per module, 224 for a 7B model, so off by default).

    Checks at the start of training that the Trainer's optimizer is a MISA optimizer, so that
    a run cannot fall back silently to an optimizer blind to the modules MISA unfreezes.
    """

    def __init__(self, log_importance: bool = False):
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
            f"{LOG_PREFIX}coverage": opt.coverage().fraction,
        }
        if opt.last_stats is not None:
            norm = float(opt.last_stats.total_norm)
            entries[f"{LOG_PREFIX}grad_norm_unclipped"] = norm
            entries[f"{LOG_PREFIX}grad_norm_clipped"] = norm * float(opt.last_stats.clip_coef)
        if self.log_importance:
            entries.update({f"{LOG_PREFIX}prob/{name}": p for name, p in opt.importance().items()})
        # The Trainer appended {**logs, "step": ...} to log_history just before this event.
        record = state.log_history[-1] if state.log_history else None
        if record is not None and record.get("step") == state.global_step and all(
                record.get(k) == v for k, v in logs.items()):
            record.update(entries)
        logs.update(entries)
