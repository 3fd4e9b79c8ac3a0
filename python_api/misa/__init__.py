"""misa: memory-efficient LLM training by Module-wise Importance SAmpling (arXiv 2511.00056).

    import misa
    optimizer = misa.MISA(model, lr=1e-5, delta=0.03, interval=50)
    print(misa.partition(model).summary(delta=0.03))

The optimizer trains, at any time, only the modules its sampler activates (importance-weighted
under a parameter budget for ``sampler="misa"``; LISA, BAdam and full AdamW are samplers too),
through the fused ops of :mod:`misa_kernels`.
"""
from . import memory, samplers
from .optimizer import MISA, Coverage
from .param_groups import weight_decay_groups
from .partition import Module, Partition, Piece, find_block_lists, partition

__all__ = ["MISA", "Coverage", "weight_decay_groups", "partition", "Partition", "Module", "Piece", "find_block_lists",
           "samplers", "memory"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``misa.models`` and ``misa.data`` moved to :mod:`misa_examples` (they are demo material,
    not part of the user API); the old names still resolve, with a DeprecationWarning, for
    scripts written against them (the shared GPU acceptance scripts among them)."""
    if name in ("models", "data"):
        import importlib
        import warnings

        warnings.warn(f"misa.{name} moved to misa_examples.{name}", DeprecationWarning, stacklevel=2)
        return importlib.import_module(f"misa_examples.{name}")
    raise AttributeError(f"module 'misa' has no attribute {name!r}")
