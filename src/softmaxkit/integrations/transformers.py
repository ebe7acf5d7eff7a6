r"""Hugging Face ``transformers`` causal LMs trained with the fused :func:`softmaxkit.linear_cross_entropy`.

A causal LM's own loss projects every position's final hidden state ``h_t`` onto the vocabulary and takes the
cross-entropy of the next token,

.. math:: ℓ = \frac{1}{n} \sum_{t:\,y_{t+1} \ne -100} \Big(\log \sum_c e^{z_{t,c}} - z_{t,y_{t+1}}\Big),
          \qquad z_t = \operatorname{cap}(W h_t + b) / T,

with ``n`` the number of counted tokens (or the ``num_items_in_batch`` that ``Trainer`` passes under gradient
accumulation), holding the ``(tokens, vocab)`` logits, their fp32 copy and their gradient on the way.
:func:`patch` makes the model's ``forward`` compute the same ``ℓ`` with :func:`softmaxkit.linear_cross_entropy`
straight from ``h`` and the output embedding ``W`` (and ``b``), a chunk of rows at a time, so those logits
never exist whole.

What stays the model's own: everything but the loss. The patched ``forward`` calls the model's own
``forward`` (decoder, attention masks, caches, gradient checkpointing, MoE routers and their auxiliary loss)
with ``labels=None`` and an empty ``logits_to_keep``, so the head projects no position, and reads the
decoder's last hidden state through a forward hook on the model's decoder (``model.get_decoder()``). The head
is the model's output embedding (``model.get_output_embeddings()``, tied or not), which must be a plain
``nn.Linear``. The loss follows ``transformers``' ``ForCausalLMLoss``: labels shifted left by one with
``-100`` appended (or ``shift_labels`` as given), ``-100`` ignored, the sum divided by ``num_items_in_batch``
when given, else the mean, computed and returned in fp32 for fp16/bf16 models; Gemma 2/3's
``final_logit_softcapping``, Granite's ``logits_scaling`` and Cohere's ``logit_scale`` are read from the model.
MoE models add ``router_aux_loss_coef · aux_loss`` as their own ``forward`` does.

Without labels (generation, inference) ``forward`` is the model's own, logits and ``logits_to_keep`` included.
With labels, in training mode (or always with ``skip_logits=True``), the returned ``logits`` is ``None``; in
eval mode the model's own path runs, so ``Trainer.evaluate`` still gets logits for its metrics.
"""

from __future__ import annotations

import inspect
import math
import types
from dataclasses import dataclass, field

import torch

from .._validation import check_accumulation_dtype
from ..functional.linear_cross_entropy import linear_cross_entropy

__all__ = ["SUPPORTED_MODELS", "is_patched", "patch", "unpatch"]

_STATE = "_softmaxkit_patch"
_INSTALL_HINT = "pip install 'softmaxkit[transformers]'"


# --------------------------------------------------------------------------------------------- families
def _no_transform(model) -> tuple[float | None, float]:
    return None, 1.0


def _final_logit_softcapping(model) -> tuple[float | None, float]:
    return getattr(model.config, "final_logit_softcapping", None), 1.0


def _granite_logits_scaling(model) -> tuple[float | None, float]:
    # logits / logits_scaling
    return None, float(model.config.logits_scaling)


def _cohere_logit_scale(model) -> tuple[float | None, float]:
    # logits * logit_scale
    return None, 1.0 / float(model.logit_scale)


#: The causal-LM classes :func:`patch` accepts, each with how its ``forward`` turns the head's output
#: ``W h + b`` into the logits its loss reads: ``(softcap, temperature)`` with logits ``cap(Wh + b)/T``.
#: Every one of them computes ``hidden = decoder(...).last_hidden_state``, slices it by ``logits_to_keep``,
#: applies ``lm_head`` and that transform, then ``self.loss_function`` (``ForCausalLMLoss``).
_FAMILIES = {
    "LlamaForCausalLM": _no_transform,
    "MistralForCausalLM": _no_transform,
    "MixtralForCausalLM": _no_transform,
    "Qwen2ForCausalLM": _no_transform,
    "Qwen2MoeForCausalLM": _no_transform,
    "Qwen3ForCausalLM": _no_transform,
    "Qwen3MoeForCausalLM": _no_transform,
    "GemmaForCausalLM": _no_transform,
    "Gemma2ForCausalLM": _final_logit_softcapping,
    "Gemma3ForCausalLM": _final_logit_softcapping,
    "PhiForCausalLM": _no_transform,
    "Phi3ForCausalLM": _no_transform,
    "GPT2LMHeadModel": _no_transform,
    "GPTNeoXForCausalLM": _no_transform,
    "OlmoForCausalLM": _no_transform,
    "Olmo2ForCausalLM": _no_transform,
    "GraniteForCausalLM": _granite_logits_scaling,
    "CohereForCausalLM": _cohere_logit_scale,
}

#: The class names :func:`patch` supports (subclasses that keep the forward included).
SUPPORTED_MODELS: tuple[str, ...] = tuple(_FAMILIES)


# ------------------------------------------------------------------------------------------------ state
@dataclass
class _PatchState:
    """What one patched model carries: the loss options, the forward it replaced, the capture slot."""

    family: str
    z_loss: float
    label_smoothing: float
    impl: str
    chunk_size: int | None
    skip_logits: bool | None
    reduction: str
    accumulation_dtype: torch.dtype | None
    #: the instance attribute ``forward`` that was there before (an accelerate hook, say), else None
    previous_forward: object
    #: names of the original forward's positional parameters, to turn positional arguments into keywords
    positional: tuple[str, ...]
    capturing: bool = False
    hidden: torch.Tensor | None = field(default=None, repr=False)

    def capture(self, module, args, output):
        """Forward hook on the decoder: keep its last hidden state while a fused loss is being computed."""
        if self.capturing:
            self.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


# ------------------------------------------------------------------------------------------ public API
def patch(
    model,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    impl: str = "auto",
    chunk_size: int | None = None,
    skip_logits: bool | None = None,
    reduction: str = "mean",
    accumulation_dtype: torch.dtype | None = None,
):
    r"""Make a Hugging Face causal LM compute its training loss with :func:`softmaxkit.linear_cross_entropy`.

    After ``patch(model)``, ``model(input_ids, attention_mask=..., labels=..., num_items_in_batch=...)``
    returns the model's own loss (same label shift, ``-100`` ignored, ``num_items_in_batch`` divisor, fp32 for
    fp16/bf16 models, Gemma's soft-cap) without ever holding the ``(tokens, vocab)`` logits; with the options
    below it adds

    .. math:: ℓ_t = (1 − ε)\,(\operatorname{LSE}(z_t) − z_{t,y}) + ε\,\big(\operatorname{LSE}(z_t) −
              \tfrac{1}{C}\textstyle\sum_c z_{t,c}\big) + λ\,\operatorname{LSE}(z_t)^2

    per counted token (label smoothing ``ε``, z-loss ``λ``). Patch before ``torch.compile(model)``, before or
    after wrapping with PEFT, and before handing the model to ``Trainer``.

    Args:
        model: a supported ``transformers`` causal LM (see :data:`SUPPORTED_MODELS`), or a PEFT model
            wrapping one; its output embedding must be a plain ``nn.Linear`` (tied to the input embedding or
            not).
        z_loss: ``λ ≥ 0`` (PaLM's z-loss); 0 is the model's own loss.
        label_smoothing: ``ε ∈ [0, 1]``; 0 is the model's own loss. Use this rather than ``Trainer``'s
            ``label_smoothing_factor``, which takes the labels away from the model and so falls back to the
            logits.
        impl: :func:`softmaxkit.linear_cross_entropy`'s ``impl`` (``"auto"``, ``"cpu"``, ``"torch"``,
            ``"triton"``, ``"triton_fused"``, ``"composite"``).
        chunk_size: rows per chunk, or None for :func:`softmaxkit.linear_cross_entropy`'s default.
        skip_logits: None (default) fuses the loss when labels are given and the model is in training mode,
            and runs the model's own forward (logits included) in eval mode; True fuses whenever labels are
            given (``logits`` is then ``None``, also in eval mode); False never fuses.
        reduction: ``"mean"`` (default): ``.loss`` is the model's own scalar loss. ``"none"``: ``.loss`` is
            the fp32 per-token loss, differentiable, shaped like the labels less the last position
            (``(batch, seq − 1)``; entry ``[b, t]`` is the loss of predicting ``labels[b, t + 1]`` from position
            ``t``, 0 where that label is ``-100``), or like ``shift_labels`` when those are given;
            ``num_items_in_batch`` is not applied (weight and reduce the tokens yourself, e.g.
            ``(loss * w).sum() / w.sum()``). In eval mode (the model's own path) the same per-token loss is
            computed from the model's logits.
        accumulation_dtype: :func:`softmaxkit.linear_cross_entropy`'s ``accumulation_dtype`` (None: fp32 for
            fp16/bf16 heads, with each chunk's ``∂W`` product a bf16 matmul on CPU; ``torch.float32`` forms
            those products in fp32 too).

    Returns:
        ``model`` itself, patched in place (patching a patched model replaces its options).

    Raises:
        ImportError: ``transformers`` is not installed.
        TypeError: ``model`` is not a supported causal LM, its head is not a plain ``nn.Linear``, or it is
            already compiled.
        ValueError: a loss option is out of range (checked by a tiny call of the loss).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM  # doctest: +SKIP
        >>> from softmaxkit.integrations.transformers import patch  # doctest: +SKIP
        >>> model = patch(LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64)))  # doctest: +SKIP
        >>> model(input_ids, labels=input_ids).loss  # doctest: +SKIP
    """
    _require_transformers()
    target = _unwrap(model)
    family = _family_of(target)
    head = _plain_head(target)
    decoder = _decoder_of(target)
    _check_options(head, z_loss, label_smoothing, impl, chunk_size, skip_logits, reduction)
    accumulation_dtype = check_accumulation_dtype(accumulation_dtype, head.weight.dtype)
    if is_patched(target):
        unpatch(target)
    previous = target.__dict__.get("forward")
    original = previous if previous is not None else types.MethodType(type(target).forward, target)
    positional = tuple(
        name for name, parameter in inspect.signature(original).parameters.items()
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )
    state = _PatchState(
        family=family, z_loss=float(z_loss), label_smoothing=float(label_smoothing), impl=impl,
        chunk_size=chunk_size, skip_logits=skip_logits, reduction=reduction,
        accumulation_dtype=accumulation_dtype, previous_forward=previous,
        positional=positional,
    )
    object.__setattr__(target, _STATE, state)  # a plain attribute, not a submodule or buffer
    decoder.register_forward_hook(state.capture)
    target.forward = types.MethodType(_forward_with_signature(original), target)
    return model


def unpatch(model):
    """Undo :func:`patch`: the model's own ``forward`` (and loss) again. A model that is not patched is
    returned unchanged.

    Args:
        model: a model passed to :func:`patch` (or the PEFT model wrapping it).

    Returns:
        ``model`` itself.
    """
    target = _unwrap(model)
    state = target.__dict__.get(_STATE)
    if state is None:
        return model
    decoder = _decoder_of(target)
    for key, hook in list(decoder._forward_hooks.items()):
        if hook == state.capture:
            del decoder._forward_hooks[key]
    if state.previous_forward is not None:
        target.forward = state.previous_forward
    else:
        target.__dict__.pop("forward", None)
    del target.__dict__[_STATE]
    return model


def is_patched(model) -> bool:
    """Whether ``model`` (or the model a PEFT model wraps) is patched by :func:`patch`."""
    return _STATE in _unwrap(model).__dict__


# ----------------------------------------------------------------------------------------- the forward
def _forward_with_signature(original):
    """A fresh function calling :func:`_patched_forward` that reports ``original``'s signature, so code that
    inspects ``model.forward`` (``Trainer`` looks for ``**kwargs``, ``generate`` for its arguments) sees the
    model's own parameters."""

    def forward(self, *args, **kwargs):
        return _patched_forward(self, *args, **kwargs)

    signature = inspect.signature(original)
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[this, *signature.parameters.values()])
    forward.__doc__ = getattr(original, "__doc__", None)
    forward.__name__ = forward.__qualname__ = "forward"
    return forward


def _patched_forward(self, *args, **kwargs):
    state = self.__dict__[_STATE]
    labels = kwargs.get("labels")
    if args:
        if len(args) > len(state.positional):
            raise TypeError(
                f"{type(self).__name__}.forward takes {len(state.positional)} positional arguments, "
                f"but {len(args)} were given"
            )
        named = dict(zip(state.positional, args))
        labels = named.get("labels", labels)
    fused = state.skip_logits if state.skip_logits is not None else self.training
    if labels is None or not fused:
        output = _own_forward(self, state, *args, **kwargs)
        if labels is not None and state.reduction == "none":
            output = _with_own_token_losses(self, output, labels, kwargs)
        return output
    if args:
        duplicate = sorted(set(named) & set(kwargs))
        if duplicate:
            raise TypeError(f"{type(self).__name__}.forward got multiple values for argument {duplicate[0]!r}")
        kwargs = {**named, **kwargs}
    kwargs = dict(kwargs)
    labels = kwargs.pop("labels")
    logits_to_keep = kwargs.pop("logits_to_keep", 0)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    no_position = torch.empty(0, dtype=torch.long, device=_plain_head(self).weight.device)
    state.capturing = True
    try:
        # the model's own forward with no labels and no position kept: the decoder, routers and caches run
        # as always, the head projects a (batch, 0, hidden) slice
        output = _own_forward(self, state, **kwargs, labels=None, logits_to_keep=no_position, return_dict=True)
        hidden = state.hidden
    finally:
        state.capturing = False
        state.hidden = None
    if hidden is None:
        raise RuntimeError(
            f"the decoder of {type(self).__name__} ({type(_decoder_of(self)).__name__}) did not run during "
            "forward, so softmaxkit's patch has no hidden states to compute the loss from"
        )
    loss = _causal_lm_loss(
        self, state, _slice_logits_to_keep(hidden, logits_to_keep), labels,
        shift_labels=kwargs.get("shift_labels"), num_items_in_batch=kwargs.get("num_items_in_batch"),
        ignore_index=kwargs.get("ignore_index", -100),
    )
    aux_loss = getattr(output, "aux_loss", None)
    if aux_loss is not None:
        # as the MoE models' own forward: loss += router_aux_loss_coef * aux_loss
        loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
    values = {key: value for key, value in output.items() if key not in ("loss", "logits")}
    output = type(output)(loss=loss, **values)
    return output if return_dict else output.to_tuple()


def _with_own_token_losses(model, output, labels, kwargs):
    """The model's own output with ``.loss`` replaced by its per-token losses (``reduction="none"``, eval)."""
    logits = output.logits if hasattr(output, "logits") else output[1]
    ignore_index = kwargs.get("ignore_index", -100)
    shift_labels = kwargs.get("shift_labels")
    shifted = shift_labels is None
    if shifted:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(logits.device)
    if logits.shape[:-1] != shift_labels.shape:
        raise ValueError(
            f"reduction='none' needs the logits of every labelled position ({tuple(shift_labels.shape)}), but "
            f"the model returned logits of shape {tuple(logits.shape)} (logits_to_keep?)"
        )
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), ignore_index=ignore_index,
        reduction="none",
    ).reshape(shift_labels.shape)
    loss = loss[..., :-1] if shifted else loss
    if isinstance(output, tuple):
        return (loss, *output[1:])
    output["loss"] = loss
    return output


def _own_forward(model, state, *args, **kwargs):
    """The forward :func:`patch` replaced (called as a function: ``torch.compile`` traces it inline)."""
    if state.previous_forward is not None:
        return state.previous_forward(*args, **kwargs)
    return type(model).forward(model, *args, **kwargs)


def _causal_lm_loss(model, state, hidden, labels, *, shift_labels, num_items_in_batch, ignore_index):
    """``ForCausalLMLoss`` of ``cap(hidden Wᵀ + b)/T`` without the logits, in fp32 for fp16/bf16 models."""
    head = _plain_head(model)
    labels_shifted = shift_labels is None
    if labels_shifted:
        # tokens < n predict n; the last position has no next token
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    rows = hidden.reshape(-1, hidden.shape[-1])
    target = shift_labels.reshape(-1).to(rows.device)
    if target.shape[0] != rows.shape[0]:
        raise ValueError(
            f"`labels` must have one entry per position whose hidden state is kept ({rows.shape[0]} positions "
            f"of hidden size {rows.shape[1]}), but holds {target.shape[0]} (labels of shape "
            f"{tuple(labels.shape)})"
        )
    # the ignored rows (padding, prompt, the last position) are not dropped here: the op's CPU kernels skip
    # them inside (softmaxkit._core.linear.kept_rows), also under torch.compile, where a data-dependent
    # shape here would break the graph
    softcap, temperature = _FAMILIES[state.family](model)
    # The loss is computed and returned in fp32, as the model's own (which upcasts the logits). linear_cross_entropy
    # returns a low-precision loss for low-precision inputs, so for fp16/bf16 it runs under autocast to that same
    # dtype: the product stays in low precision (no fp32 copy of the head's weight) and the op's autocast rule
    # returns the loss computed in fp32, as F.cross_entropy's does. A user's own autocast region is switched off
    # here, so the product is not recast inside the op.
    dtype = torch.promote_types(rows.dtype, head.weight.dtype)
    low_precision = dtype in (torch.float16, torch.bfloat16)
    bias = None if head.bias is None else head.bias.to(dtype)
    with torch.autocast(device_type=rows.device.type, dtype=dtype if low_precision else None,
                        enabled=low_precision):
        loss = linear_cross_entropy(
            rows.to(dtype), head.weight.to(dtype), target, bias=bias, ignore_index=ignore_index,
            reduction=state.reduction if state.reduction == "none" or num_items_in_batch is None else "sum",
            label_smoothing=state.label_smoothing, z_loss=state.z_loss, softcap=softcap,
            temperature=temperature, chunk_size=state.chunk_size, impl=state.impl,
            accumulation_dtype=state.accumulation_dtype,
        )
    if state.reduction == "none":
        loss = loss.reshape(shift_labels.shape)
        return loss[..., :-1] if labels_shifted else loss
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _slice_logits_to_keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The positions the model's own forward would project (``transformers``' ``slice_logits_to_keep``)."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:, :]
    if logits_to_keep.ndim == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden[logits_to_keep]
        return torch.take_along_dim(hidden, logits_to_keep[..., None], dim=1)
    return hidden[:, logits_to_keep, :]


# ------------------------------------------------------------------------------------------- checks
def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"softmaxkit.integrations.transformers needs the transformers package: {_INSTALL_HINT}"
        ) from error


def _unwrap(model):
    """The ``transformers`` model itself: PEFT models are unwrapped; compiled models are refused."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(
            "`model` is already compiled (torch.compile); patch it first, then compile: "
            "model = torch.compile(patch(model))"
        )
    get_base_model = getattr(model, "get_base_model", None)  # peft.PeftModel
    if callable(get_base_model) and hasattr(model, "peft_config"):
        return get_base_model()
    return model


def _family_of(model) -> str:
    if isinstance(model, torch.nn.Module):
        for klass in type(model).__mro__:
            if klass.__name__ in _FAMILIES and klass.__module__.startswith("transformers."):
                return klass.__name__
    raise TypeError(
        f"`model` must be a transformers causal LM whose head is a plain projection, one of "
        f"{', '.join(SUPPORTED_MODELS)} (or a PEFT model wrapping one), but got {type(model).__name__}"
    )


def _active_module(head):
    """The module a PEFT ``ModulesToSaveWrapper`` forwards to: the active adapter's trained copy, or the
    original module when adapters are disabled (any other module is returned as is)."""
    if type(head).__name__ != "ModulesToSaveWrapper" or "peft" not in type(head).__module__:
        return head
    active = head.active_adapters
    if head.disable_adapters or not active or active[0] not in head.modules_to_save:
        return head.original_module
    return head.modules_to_save[active[0]]


def _plain_head(model) -> torch.nn.Linear:
    head = _active_module(model.get_output_embeddings())
    if not (isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward):
        hint = (
            " (a PEFT adapter on the head: leave lm_head out of target_modules; modules_to_save is supported)"
            if head is not None and "peft" in type(head).__module__ else ""
        )
        raise TypeError(
            f"the output embedding of {type(model).__name__} (model.get_output_embeddings()) must be a plain "
            f"torch.nn.Linear for the fused loss, but is {type(head).__name__}{hint}"
        )
    if head.weight.device.type == "meta":
        raise TypeError(
            f"the output embedding of {type(model).__name__} has its weight on the meta device (offloaded); "
            "the fused loss needs it materialised on the device of the hidden states"
        )
    return head


def _decoder_of(model) -> torch.nn.Module:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "base_model", None)
    if not isinstance(decoder, torch.nn.Module) or decoder is model:
        raise TypeError(f"{type(model).__name__} has no decoder (model.get_decoder() / model.base_model)")
    return decoder


def _check_options(head, z_loss, label_smoothing, impl, chunk_size, skip_logits, reduction) -> None:
    """Validate the options with the loss's own checks, on one tiny row on the head's device."""
    if not isinstance(reduction, str) or reduction not in ("mean", "none"):
        raise ValueError(
            f"`reduction` must be 'mean' (the model's own loss) or 'none' (per-token losses), but got {reduction!r}"
        )
    if skip_logits is not None and not isinstance(skip_logits, bool):
        raise TypeError(f"`skip_logits` must be None or a bool, but got {type(skip_logits).__name__}")
    for name, value in (("z_loss", z_loss), ("label_smoothing", label_smoothing)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"`{name}` must be a finite float, but got {value!r}")
    device = head.weight.device
    with torch.no_grad():
        linear_cross_entropy(
            torch.zeros(1, 1, device=device), torch.zeros(2, 1, device=device),
            torch.zeros(1, dtype=torch.long, device=device), z_loss=z_loss, label_smoothing=label_smoothing,
            chunk_size=chunk_size, impl=impl,
        )
