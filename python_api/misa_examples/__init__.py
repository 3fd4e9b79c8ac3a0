"""misa_examples: what the benchmarks, the tests and the main job train on, kept out of the
user package ``misa``.

- :mod:`misa_examples.models`: a small LLaMA-style causal LM with Hugging Face's parameter
  names, and the shapes of LLaMA-2-7B / LLaMA-3-8B (``CONFIGS``) to build on the meta device;
- :mod:`misa_examples.data`: byte-level corpora every machine has offline (the Python standard
  library's source, pydoc's help topics).
"""
