"""One training step (forward + backward) of a tiny Hugging Face causal LM, by how its loss is computed.

The model: ``LlamaForCausalLM`` built from a config (no download): vocabulary 32000, hidden 256, 2 layers
(4 heads, MLP 1024), a batch of 4 × 256 tokens with right padding (``-100`` labels on it and on a prompt
prefix), in the benchmark's dtype (fp32, bf16: the model is cast, as a bf16 training run holds it). ``full``
is the forward with labels and ``torch.autograd.grad`` of every parameter (nothing accumulates into
``.grad``); ``forward`` is the same forward under ``no_grad``. Peak memory is the harness's: the first call's
growth over the memory held after setup (model, batch), so it counts the activations, the loss's buffers and
the gradients.

Impls:

* ``torch``: the model's own loss (``labels=...``: ``(tokens, vocab)`` logits, their fp32 copy, their
  gradient). The baseline of every ratio.
* ``softmaxkit``: ``softmaxkit.integrations.transformers.patch(model)``.
* ``softmaxkit_compiled``: ``torch.compile(patch(model))`` (compiled in setup, by one untimed step; not in
  the quick set, nor is ``cut_cross_entropy``: compiling takes minutes on CPU).
* ``torch_chunked``: the decoder's last hidden state into PyTorch's own ``F.linear_cross_entropy`` (its
  chunked path with default ``LinearCrossEntropyOptions``), labels shifted by hand.
* ``cut_cross_entropy``: the same with cut-cross-entropy's ``linear_cross_entropy(..., shift=1)``: its Triton
  kernels (``impl="cce"``) on CUDA, its ``impl="torch_compile"`` on CPU (compiled in setup, by one untimed
  step).
* ``liger``: the same with Liger-Kernel's fused linear cross-entropy (Triton, CUDA only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._harness import Case, Skip, timed_call

#: (batch, sequence, vocabulary, hidden, layers)
SHAPES = [(4, 256, 32000, 256, 2)]
QUICK_SHAPES = [(2, 32, 2000, 64, 1)]


def _model(vocab, hidden, layers, dtype, device):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as error:
        raise Skip(f"transformers not installed ({error}): pip install 'softmaxkit[transformers]'") from error
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=0,
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).train()


def _batch(rows, length, vocab, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    input_ids = torch.randint(1, vocab, (rows, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for row in range(rows):  # right padding of 0, 1/8, 2/8, ... of the sequence
        pad = (row * length) // 8
        if pad:
            attention_mask[row, -pad:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, : length // 16] = -100
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def _hidden_then(loss_of_hidden):
    """A loss function of (model, batch): the decoder's last hidden state into ``loss_of_hidden``."""

    def run(model, input_ids, attention_mask, labels):
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        head = model.get_output_embeddings()
        return loss_of_hidden(hidden, head.weight, labels)

    return run


def _shifted(labels):
    return F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)


def _own(model):
    return lambda m, ids, mask, labels: m(input_ids=ids, attention_mask=mask, labels=labels).loss


def _softmaxkit(model, compiled):
    from softmaxkit.integrations.transformers import patch

    patched = patch(model)
    target = torch.compile(patched) if compiled else patched
    return lambda m, ids, mask, labels: target(input_ids=ids, attention_mask=mask, labels=labels).loss


def _torch_chunked(model):
    try:
        from torch.nn import LinearCrossEntropyOptions
    except ImportError as error:  # pragma: no cover - older torch
        raise Skip(f"this torch has no F.linear_cross_entropy / LinearCrossEntropyOptions ({error})") from error
    options = LinearCrossEntropyOptions()

    def loss(hidden, weight, labels):
        return F.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, _shifted(labels),
                                      ignore_index=-100, options=options).float()

    return _hidden_then(loss)


def _cut_cross_entropy(model, device):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as error:
        raise Skip(f"cut-cross-entropy not installed ({error})") from error
    impl = "cce" if device == "cuda" else "torch_compile"  # its Triton kernels need CUDA

    def loss(hidden, weight, labels):
        return linear_cross_entropy(hidden, weight, labels, ignore_index=-100, shift=1, impl=impl).float()

    return _hidden_then(loss)


def _liger(model, device):
    if device != "cuda":
        raise Skip("liger-kernel runs on CUDA only (Triton kernels)")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as error:  # pragma: no cover
        raise Skip(f"liger-kernel not installed ({error})") from error

    def loss(hidden, weight, labels):
        return liger_fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, _shifted(labels),
                                                ignore_index=-100).float()

    return _hidden_then(loss)


def _setup(factory, shape, dtype, device, mode, warm):
    rows, length, vocab, hidden, layers = shape
    model = _model(vocab, hidden, layers, dtype, device)
    input_ids, attention_mask, labels = _batch(rows, length, vocab, device)
    loss_fn = factory(model)
    params = [p for p in model.parameters() if p.requires_grad]
    step = timed_call(lambda: loss_fn(model, input_ids, attention_mask, labels), params, mode)
    if warm:
        step()  # compile here, not in the measured first call
    return step


def cases(device: str, dtype: torch.dtype, quick: bool, shapes=None) -> list[Case]:
    """The cases of every impl at ``shapes`` (default: the quick or the full set; ``(batch, sequence,
    vocabulary, hidden, layers)`` tuples), compiled impls left out of the quick set."""
    dtype_name = str(dtype).replace("torch.", "")
    impls = {
        "torch": (_own, False),
        "softmaxkit": (lambda m: _softmaxkit(m, compiled=False), False),
        "softmaxkit_compiled": (lambda m: _softmaxkit(m, compiled=True), True),
        "torch_chunked": (_torch_chunked, False),
        "cut_cross_entropy": (lambda m: _cut_cross_entropy(m, device), True),
        "liger": (lambda m: _liger(m, device), False),
    }
    out = []
    for shape in shapes or (QUICK_SHAPES if quick else SHAPES):
        rows, length, vocab, hidden, layers = shape
        for impl, (factory, compiled) in impls.items():
            if quick and compiled:
                continue  # compiling takes 0.5-2 minutes per case on CPU: not for the quick set
            def setup(mode, factory=factory, shape=shape, compiled=compiled):
                return _setup(factory, shape, dtype, device, mode, warm=compiled)

            out.append(Case("hf_causal_lm", impl, f"{rows}x{length}-V{vocab}-D{hidden}-L{layers}", dtype_name,
                            setup, modes=("forward", "full")))
    return out
