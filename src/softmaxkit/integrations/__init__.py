"""Integrations of softmaxkit's losses with training libraries.

* :mod:`softmaxkit.integrations.transformers`: ``patch(model)`` makes a Hugging Face causal LM train with the
  fused :func:`softmaxkit.linear_cross_entropy` (needs the ``transformers`` extra).

Each integration imports its library only when used, so ``import softmaxkit`` never needs them.
"""
