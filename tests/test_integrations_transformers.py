"""softmaxkit.integrations.transformers: a patched causal LM's loss and gradients equal the model's own.

Tiny random models built from configs (no downloads). fp32 budgets: 1e-5 relative loss, 1e-4 relative
gradient (``max |g − g_own| / max |g_own|`` per parameter); the fused loss changes only the order of the
head's sums, so both sit orders of magnitude above what is observed (~1e-7 and ~1e-6).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from softmaxkit.integrations.transformers import SUPPORTED_MODELS, is_patched, patch, unpatch  # noqa: E402

VOCAB = 1000
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1)
#: class name -> (config class, config overrides); dropout off so two forwards in train mode agree.
SPECS = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "MistralForCausalLM": ("MistralConfig", {}),
    "MixtralForCausalLM": ("MixtralConfig", dict(num_local_experts=4, **MOE)),
    "Qwen2ForCausalLM": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", dict(num_experts=4, moe_intermediate_size=32,
                                                    shared_expert_intermediate_size=32, **MOE)),
    "Qwen3ForCausalLM": ("Qwen3Config", dict(head_dim=8, tie_word_embeddings=True)),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(head_dim=8, num_experts=4, moe_intermediate_size=32, **MOE)),
    "GemmaForCausalLM": ("GemmaConfig", dict(head_dim=8)),
    # a small cap so that the soft-cap bends the logits (scaled up below) hard
    "Gemma2ForCausalLM": ("Gemma2Config", dict(head_dim=8, final_logit_softcapping=2.0, sliding_window=8)),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", dict(head_dim=8, final_logit_softcapping=2.0, sliding_window=8)),
    "PhiForCausalLM": ("PhiConfig", dict(resid_pdrop=0.0, embd_pdrop=0.0)),
    "Phi3ForCausalLM": ("Phi3Config", dict(resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1, eos_token_id=2)),
    "GPT2LMHeadModel": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                           eos_token_id=2)),
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", dict(hidden_dropout=0.0, attention_dropout=0.0, eos_token_id=2)),
    "OlmoForCausalLM": ("OlmoConfig", {}),
    "Olmo2ForCausalLM": ("Olmo2Config", {}),
    "GraniteForCausalLM": ("GraniteConfig", dict(logits_scaling=4.0)),
    "CohereForCausalLM": ("CohereConfig", dict(logit_scale=0.5, eos_token_id=2)),
}
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def build(name: str, dtype=torch.float32, **overrides):
    config_name, extra = SPECS[name]
    kwargs = {} if config_name == "GPT2Config" else dict(COMMON)
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, config_name)(**kwargs)
    model = getattr(transformers, name)(config)
    with torch.no_grad():
        # random init gives logits of ~1e-2: scale the head so logits span a few units (soft-cap active)
        model.get_output_embeddings().weight.mul_(30.0)
    return model.to(dtype).train()


def batch(rows=3, length=12, seed=0):
    """Right-padded token ids, their mask, and labels with -100 on the padding and on a prompt prefix."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (rows, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -4:] = 0
    attention_mask[2, -7:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :3] = -100  # a prompt that is not trained on
    return input_ids, attention_mask, labels


def loss_and_grads(model, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    output = model(*args, **kwargs)
    output.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return output, grads


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def assert_same_training_signal(own, own_grads, ours, our_grads, loss_rtol=LOSS_RTOL, grad_rtol=GRAD_RTOL):
    assert ours.loss.dtype == torch.float32
    assert abs(ours.loss.item() - own.loss.item()) <= loss_rtol * abs(own.loss.item())
    assert our_grads.keys() == own_grads.keys()
    for name, grad in own_grads.items():
        assert relative_error(our_grads[name], grad) <= grad_rtol, name


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", SUPPORTED_MODELS)
def test_loss_and_every_gradient_equal_the_models_own(name):
    model = build(name)
    input_ids, attention_mask, labels = batch()
    own, own_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels)
    patch(model)
    ours, our_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels)
    assert ours.logits is None  # never materialised
    assert_same_training_signal(own, own_grads, ours, our_grads)
    if getattr(model.config, "output_router_logits", False):
        # the router's auxiliary loss is part of the loss, as in the model's own forward
        assert ours.aux_loss is not None and own.aux_loss is not None
        torch.testing.assert_close(ours.aux_loss, own.aux_loss)
        assert model.router_aux_loss_coef * ours.aux_loss.item() > 1e-2  # large enough to be seen in the loss
        assert any("gate" in key or "router" in key for key in our_grads)


def test_the_families_the_issue_names_are_covered_with_their_head_features():
    gemma = build("Gemma2ForCausalLM")
    qwen = build("Qwen2ForCausalLM")
    for model in (gemma, qwen):  # tied: the head is the input embedding
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # the soft-cap changes the loss substantially here, so matching the own loss means it was applied
    input_ids, attention_mask, labels = batch()
    capped = patch(gemma)(input_ids, attention_mask=attention_mask, labels=labels).loss
    gemma.config.final_logit_softcapping = None
    uncapped = gemma(input_ids, attention_mask=attention_mask, labels=labels).loss
    assert abs(capped.item() - uncapped.item()) > 0.1


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Gemma2ForCausalLM", "Qwen2ForCausalLM"])
def test_num_items_in_batch_divides_the_sum(name):
    model = build(name)
    input_ids, attention_mask, labels = batch()
    # gradient accumulation: the count of the whole accumulated batch, larger than this micro-batch's
    num_items = torch.tensor(57)
    own, own_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels,
                                    num_items_in_batch=num_items)
    patch(model)
    ours, our_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels,
                                     num_items_in_batch=num_items)
    assert_same_training_signal(own, own_grads, ours, our_grads)
    ours_int, _ = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels,
                                 num_items_in_batch=57)
    assert abs(ours_int.loss.item() - own.loss.item()) <= LOSS_RTOL * own.loss.item()


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


def test_the_tokens_by_vocabulary_logits_never_exist():
    model = build("LlamaForCausalLM")
    input_ids, attention_mask, labels = batch()
    tokens = input_ids.numel()
    with _LargestTensor() as own:
        model(input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    assert own.numel >= tokens * VOCAB  # the own loss holds them (the test can fail)
    patch(model, chunk_size=8)
    with _LargestTensor() as ours:
        model(input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    # the largest tensors are now the parameters' gradients (VOCAB x hidden) and one chunk of 8 rows' logits
    assert ours.numel <= max(8 * VOCAB, VOCAB * 32) < tokens * VOCAB


def test_padding_equals_dropping_the_padded_positions():
    model = patch(build("LlamaForCausalLM"))
    input_ids, attention_mask, labels = batch()
    padded = model(input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=1).loss
    total = 0.0
    for row in range(input_ids.shape[0]):
        keep = int(attention_mask[row].sum())
        total += model(input_ids[row:row + 1, :keep], labels=labels[row:row + 1, :keep],
                       num_items_in_batch=1).loss.item()
    assert abs(padded.item() - total) <= 1e-5 * total


def test_shift_labels_as_given():
    model = build("LlamaForCausalLM")
    input_ids, attention_mask, labels = batch()
    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    shift_labels[1, 0] = -100  # differs from labels shifted, so the given one must be the one used
    own, own_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels,
                                    shift_labels=shift_labels)
    patch(model)
    ours, our_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels,
                                     shift_labels=shift_labels)
    assert_same_training_signal(own, own_grads, ours, our_grads)


def test_every_label_ignored_gives_zero_loss_and_zero_gradient():
    model = patch(build("LlamaForCausalLM"))
    input_ids, attention_mask, _ = batch()
    ours, grads = loss_and_grads(model, input_ids, attention_mask=attention_mask,
                                 labels=torch.full_like(input_ids, -100))
    assert ours.loss.item() == 0.0  # the model's own is NaN (0/0)
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


# ------------------------------------------------------------------------------- reduction="none"
def _own_token_losses(model, input_ids, attention_mask, labels):
    """The model's own per-token losses: ``F.cross_entropy(reduction="none")`` on its logits, shifted."""
    logits = model(input_ids, attention_mask=attention_mask).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="none"
    ).reshape(labels.shape[0], -1)


def _token_weights(shape):
    return torch.rand(shape, generator=torch.Generator().manual_seed(1)) + 0.5


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Gemma2ForCausalLM", "Qwen2ForCausalLM"])
def test_reduction_none_gives_the_models_own_per_token_losses_and_their_gradients(name):
    model = build(name)
    input_ids, attention_mask, labels = batch()
    weights = _token_weights((labels.shape[0], labels.shape[1] - 1))
    model.zero_grad(set_to_none=True)
    own = _own_token_losses(model, input_ids, attention_mask, labels)
    (own * weights).sum().backward()  # a per-token weighting, what per-token losses are asked for
    own_grads = {key: p.grad.detach().clone() for key, p in model.named_parameters() if p.grad is not None}
    patch(model, reduction="none")
    model.zero_grad(set_to_none=True)
    ours = model(input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=torch.tensor(57)).loss
    assert ours.shape == (3, 11) and ours.dtype == torch.float32
    ignored = labels[:, 1:] == -100
    assert ignored.any() and torch.all(ours[ignored] == 0)  # exactly 0 where the next label is ignored
    torch.testing.assert_close(ours, own, rtol=LOSS_RTOL, atol=LOSS_RTOL * own.abs().max().item())
    (ours * weights).sum().backward()
    grads = {key: p.grad for key, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == own_grads.keys()
    for key, grad in own_grads.items():
        assert relative_error(grads[key], grad) <= GRAD_RTOL, key
    model.eval()  # the model's own path: the same per-token losses from its logits
    with torch.no_grad():
        evaluated = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert evaluated.logits is not None
    torch.testing.assert_close(evaluated.loss, own.detach(), rtol=LOSS_RTOL, atol=LOSS_RTOL * own.abs().max().item())


def test_reduction_none_with_shift_labels_keeps_their_shape_and_bf16_is_fp32():
    model = build("LlamaForCausalLM", dtype=torch.bfloat16)
    input_ids, attention_mask, labels = batch()
    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    with torch.no_grad():
        own = _own_token_losses(model, input_ids, attention_mask, labels)
        ours = patch(model, reduction="none")(
            input_ids, attention_mask=attention_mask, labels=labels, shift_labels=shift_labels
        ).loss
    assert ours.shape == shift_labels.shape and ours.dtype == torch.float32
    assert torch.all(ours[:, -1] == 0)
    # bf16 logits (8 bits of mantissa) rounded differently by the fused and the model's own product
    torch.testing.assert_close(ours[:, :-1], own, rtol=2e-2, atol=2e-2 * own.abs().max().item())


# -------------------------------------------------------------------------------------- low precision
def _fp64_copy(model):
    return copy.deepcopy(model).to(torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Gemma2ForCausalLM", "Qwen2ForCausalLM"])
def test_low_precision_loss_is_fp32_and_within_the_dtypes_budget(name, dtype):
    check_low_precision_budget(name, dtype)


def check_low_precision_budget(name, dtype, device="cpu", **options):
    """Error budget against the float64 oracle (the same low-precision weights, computed in float64).

    The model's own loss rounds each logit to ``dtype`` before its fp32 cross-entropy; the fused loss takes the
    products in fp32 (or, with ``impl="triton"``, rounds them as the model's own head does), so its loss may be
    no further from the oracle than the own loss is plus fp32 rounding (``1e-5`` relative). Gradients pass through the same low-precision decoder backward in both paths, whose
    rounding dominates their error (~1e-2 in bf16, ~1e-3 in fp16 here) and differs from one upstream gradient
    to another: over all parameters together (relative L2 error) the fused gradient may be no further from the
    oracle than the own one plus one rounding to ``dtype`` (``u = 2^-8`` bf16, ``2^-11`` fp16); per parameter
    (relative max error) no more than twice as far plus ``u``, the spread of that rounding noise between two
    upstream gradients.
    """
    model = build(name, dtype=dtype).to(device)
    oracle_model = _fp64_copy(model)
    input_ids, attention_mask, labels = (t.to(device) for t in batch())
    oracle, oracle_grads = loss_and_grads(oracle_model, input_ids, attention_mask=attention_mask, labels=labels)
    own, own_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels)
    # the loss oracle: float64 head and cross-entropy on the very hidden states the low-precision decoder gave
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids, attention_mask=attention_mask).last_hidden_state.double()
        logits = hidden @ model.get_output_embeddings().weight.double().T
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        loss_oracle = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), shifted.reshape(-1)).item()
    patch(model, **options)
    ours, our_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels)
    assert own.loss.dtype == torch.float32 and ours.loss.dtype == torch.float32
    assert abs(ours.loss.item() - loss_oracle) <= abs(own.loss.item() - loss_oracle) + 1e-5 * loss_oracle
    unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    flat = {key: torch.cat([grads[k].double().flatten() for k in oracle_grads])
            for key, grads in (("oracle", oracle_grads), ("own", own_grads), ("ours", our_grads))}
    own_l2 = ((flat["own"] - flat["oracle"]).norm() / flat["oracle"].norm()).item()
    our_l2 = ((flat["ours"] - flat["oracle"]).norm() / flat["oracle"].norm()).item()
    assert our_l2 <= own_l2 + unit
    for key, reference in oracle_grads.items():
        own_error = relative_error(own_grads[key], reference)
        our_error = relative_error(our_grads[key], reference)
        assert our_error <= 2 * own_error + unit, key
    assert abs(oracle.loss.item() - loss_oracle) < 0.05 * loss_oracle  # the oracles agree (sanity)


@pytest.mark.parametrize("impl", ["triton", "triton_fused"])
@pytest.mark.parametrize("name", ["Gemma2ForCausalLM", "Qwen2ForCausalLM"])
def test_bfloat16_through_the_triton_kernels_is_within_the_budget(name, impl):
    """The Triton paths a GPU user gets (interpreted on CPU-only machines), in bf16: soft-cap and tied head."""
    pytest.importorskip("triton")
    check_low_precision_budget(name, torch.bfloat16, impl=impl)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["auto", "triton_fused"])
@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Gemma2ForCausalLM", "Qwen2ForCausalLM"])
def test_gpu_loss_and_every_gradient_equal_the_models_own(name, impl):
    """On CUDA: fp32 within the parity budgets (TF32 stays off: PyTorch's default for matmuls), bf16 within the
    dtype's budget against the float64 oracle."""
    model = build(name).cuda()
    input_ids, attention_mask, labels = (t.cuda() for t in batch())
    own, own_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels)
    patch(model, impl=impl)
    ours, our_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels)
    assert_same_training_signal(own, own_grads, ours, our_grads)
    check_low_precision_budget(name, torch.bfloat16, device="cuda", impl=impl)


def test_autocast_fp32_model_trains_with_an_fp32_loss():
    model = build("LlamaForCausalLM")
    input_ids, attention_mask, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own = model(input_ids, attention_mask=attention_mask, labels=labels).loss
        ours = patch(model)(input_ids, attention_mask=attention_mask, labels=labels).loss
    assert ours.dtype == torch.float32
    # the own loss rounds the logits to bf16 under autocast; ours computes the head in fp32
    assert abs(ours.item() - own.item()) <= 2.0 ** -8 * abs(own.item())


# ------------------------------------------------------------------------------------------ options
def test_z_loss_and_label_smoothing_equal_their_definitions_on_the_models_logits():
    model = build("Gemma2ForCausalLM")
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits.double()  # soft-capped, own forward
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    rows = logits.reshape(-1, VOCAB)[shifted != -100]
    target = shifted[shifted != -100]
    eps, lam = 0.1, 1e-3
    lse = torch.logsumexp(rows, dim=-1)
    nll = lse - rows.gather(1, target[:, None]).squeeze(1)
    smooth = lse - rows.mean(dim=-1)
    expected = ((1 - eps) * nll + eps * smooth + lam * lse**2).mean().item()
    patch(model, z_loss=lam, label_smoothing=eps)
    ours = model(input_ids, attention_mask=attention_mask, labels=labels).loss.item()
    assert abs(ours - expected) <= LOSS_RTOL * expected


@pytest.mark.parametrize("impl", ["torch", "composite", "triton", "triton_fused"])
def test_impl_and_chunk_size_pass_through(impl):
    if impl.startswith("triton"):
        pytest.importorskip("triton")  # interpreted on CPU-only machines (conftest)
    model = build("Qwen2ForCausalLM")
    input_ids, attention_mask, labels = batch()
    own, own_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels)
    patch(model, impl=impl, chunk_size=5)
    ours, our_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels)
    assert_same_training_signal(own, own_grads, ours, our_grads)


def test_accumulation_dtype_reaches_the_loss_and_fp32_products_are_no_less_exact():
    """bf16 model: the default builds the head's ∂W from bf16 chunk products (CPU); fp32 accumulation asked for
    explicitly forms them in fp32, so its head gradient is closer (normwise) to the float64 oracle's."""
    model = build("LlamaForCausalLM", dtype=torch.bfloat16)
    oracle_model = _fp64_copy(model)
    input_ids, attention_mask, labels = batch()
    _, oracle_grads = loss_and_grads(oracle_model, input_ids, attention_mask=attention_mask, labels=labels)
    errors = {}
    for accumulation in (None, torch.float32):
        patch(model, accumulation_dtype=accumulation, chunk_size=8)
        assert model.__dict__["_softmaxkit_patch"].accumulation_dtype == accumulation
        _, grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels)
        got, exact = grads["lm_head.weight"].double(), oracle_grads["lm_head.weight"].double()
        errors[accumulation] = ((got - exact).norm() / exact.norm()).item()  # normwise: the products' rounding
    assert errors[torch.float32] < errors[None]


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(impl="fastest"), ValueError, "impl"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(z_loss="a lot"), TypeError, "z_loss"),
        (dict(skip_logits="yes"), TypeError, "skip_logits"),
        (dict(reduction="sum"), ValueError, "reduction"),
        (dict(accumulation_dtype=torch.int32), TypeError, "accumulation_dtype"),
        (dict(accumulation_dtype=torch.float16), ValueError, "accumulation_dtype"),
    ],
)
def test_bad_options_are_refused_at_patch_time(options, error, match):
    model = build("LlamaForCausalLM")
    with pytest.raises(error, match=match):
        patch(model, **options)
    assert not is_patched(model)


# ------------------------------------------------------------------------- no labels, eval, outputs
def test_without_labels_the_forward_is_the_models_own_and_honours_logits_to_keep():
    model = build("Gemma2ForCausalLM")
    input_ids, attention_mask, _ = batch()
    with torch.no_grad():
        own_all = model(input_ids, attention_mask=attention_mask).logits
        own_last = model(input_ids, attention_mask=attention_mask, logits_to_keep=1).logits
        patch(model)
        ours_all = model(input_ids, attention_mask=attention_mask).logits
        ours_last = model(input_ids, attention_mask=attention_mask, logits_to_keep=1).logits
    assert ours_last.shape == (3, 1, VOCAB)
    assert torch.equal(ours_all, own_all) and torch.equal(ours_last, own_last)


def test_logits_to_keep_with_labels_keeps_the_same_positions():
    model = build("LlamaForCausalLM")
    input_ids, attention_mask, labels = batch()
    kept_labels = labels[:, -5:]
    own, own_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=kept_labels,
                                    logits_to_keep=5)
    patch(model)
    ours, our_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=kept_labels,
                                     logits_to_keep=5)
    assert_same_training_signal(own, own_grads, ours, our_grads)
    index = torch.tensor([0, 4, 5, 9])
    own_index, _ = loss_and_grads(unpatch(copy.deepcopy(model)), input_ids, labels=labels[:, index],
                                  logits_to_keep=index)
    ours_index, _ = loss_and_grads(model, input_ids, labels=labels[:, index], logits_to_keep=index)
    assert abs(ours_index.loss.item() - own_index.loss.item()) <= LOSS_RTOL * own_index.loss.item()


def test_eval_mode_runs_the_models_own_path_unless_skip_logits():
    model = build("LlamaForCausalLM")
    input_ids, attention_mask, labels = batch()
    model.eval()
    with torch.no_grad():
        own = model(input_ids, attention_mask=attention_mask, labels=labels)
        evaluated = patch(model)(input_ids, attention_mask=attention_mask, labels=labels)
        assert torch.equal(evaluated.logits, own.logits) and evaluated.loss.item() == own.loss.item()
        fused = patch(model, skip_logits=True)(input_ids, attention_mask=attention_mask, labels=labels)
        assert fused.logits is None
        assert abs(fused.loss.item() - own.loss.item()) <= LOSS_RTOL * own.loss.item()
    model.train()
    never = patch(model, skip_logits=False)(input_ids, attention_mask=attention_mask, labels=labels)
    assert never.logits is not None


def test_positional_arguments_and_tuple_outputs():
    model = build("MixtralForCausalLM")
    input_ids, attention_mask, labels = batch()
    own = model(input_ids, attention_mask, labels=labels, return_dict=False)
    patch(model)
    # LlamaForCausalLM-style order: input_ids, attention_mask, position_ids, cache, inputs_embeds, labels
    ours = model(input_ids, attention_mask, None, None, None, labels, return_dict=False)
    assert isinstance(ours, tuple)
    assert abs(ours[0].item() - own[0].item()) <= LOSS_RTOL * own[0].item()  # the loss comes first
    # the own tuple is (loss, aux_loss, logits, ...); ours has no logits: (loss, aux_loss, ...)
    torch.testing.assert_close(ours[1], own[1])
    with pytest.raises(TypeError, match="multiple values"):
        model(input_ids, attention_mask, None, None, None, labels, labels=labels)


def test_generate_is_unchanged():
    model = build("LlamaForCausalLM").eval()
    input_ids = batch()[0][:1, :5]
    expected = model.generate(input_ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(patch(model).generate(input_ids, max_new_tokens=4, do_sample=False), expected)


# -------------------------------------------------------------------------------- patch lifecycle
def test_unpatch_restores_the_models_own_forward():
    model = build("LlamaForCausalLM")
    input_ids, attention_mask, labels = batch()
    own = model(input_ids, attention_mask=attention_mask, labels=labels)
    hooks_before = dict(model.get_decoder()._forward_hooks)
    patch(model, z_loss=1e-2)
    assert is_patched(model) and "forward" in model.__dict__
    patch(model)  # patching again replaces the options
    assert len(model.get_decoder()._forward_hooks) == len(hooks_before) + 1
    assert unpatch(model) is model
    assert not is_patched(model) and "forward" not in model.__dict__
    assert dict(model.get_decoder()._forward_hooks) == hooks_before
    restored = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert restored.loss.item() == own.loss.item() and torch.equal(restored.logits, own.logits)
    assert unpatch(model) is model  # unpatching an unpatched model is a no-op


def test_a_deep_copy_is_patched_on_its_own():
    model = patch(build("LlamaForCausalLM"))
    twin = copy.deepcopy(model)
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        twin.get_output_embeddings().weight.mul_(0.5)
    unpatch(model)
    assert is_patched(twin)
    ours = twin(input_ids, attention_mask=attention_mask, labels=labels)
    own = unpatch(copy.deepcopy(twin))(input_ids, attention_mask=attention_mask, labels=labels)
    assert ours.logits is None
    assert abs(ours.loss.item() - own.loss.item()) <= LOSS_RTOL * own.loss.item()


def test_the_signature_trainer_inspects_is_the_models_own():
    import inspect

    model = build("LlamaForCausalLM")
    own = inspect.signature(model.forward)
    assert inspect.signature(patch(model).forward) == own
    assert any(p.kind == inspect.Parameter.VAR_KEYWORD for p in own.parameters.values())


def test_unsupported_models_get_an_error_naming_what_is_supported():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=64)
    with pytest.raises(TypeError, match=r"LlamaForCausalLM, .*Gemma2ForCausalLM.*, but got BertForMaskedLM"):
        patch(transformers.BertForMaskedLM(config))
    with pytest.raises(TypeError, match="but got Linear"):
        patch(torch.nn.Linear(2, 2))


def test_a_head_that_is_not_a_plain_projection_is_refused():
    model = build("LlamaForCausalLM")

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    head = Scaled(32, VOCAB, bias=False)
    model.set_output_embeddings(head)
    with pytest.raises(TypeError, match="plain torch.nn.Linear.*but is Scaled"):
        patch(model)


def test_a_compiled_model_is_refused_with_the_right_order():
    with pytest.raises(TypeError, match=r"patch it first, then compile"):
        patch(torch.compile(build("LlamaForCausalLM")))


def test_a_head_with_bias_is_used():
    model = build("LlamaForCausalLM")
    old = model.get_output_embeddings()
    head = torch.nn.Linear(32, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.normal_(0, 1)
    model.set_output_embeddings(head)
    input_ids, attention_mask, labels = batch()
    own, own_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels)
    patch(model)
    ours, our_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels)
    assert "lm_head.bias" in our_grads
    assert_same_training_signal(own, own_grads, ours, our_grads)


# ------------------------------------------------------------------- training stack: ckpt, PEFT, Trainer
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Gemma2ForCausalLM"])
def test_gradient_checkpointing(name, reentrant):
    model = build(name)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    input_ids, attention_mask, labels = batch()
    own, own_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels)
    patch(model)
    ours, our_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels)
    assert_same_training_signal(own, own_grads, ours, our_grads)


@pytest.mark.parametrize("order", ["patch_then_wrap", "wrap_then_patch"])
def test_peft_lora(order):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    base = build("Qwen2ForCausalLM")
    reference = peft.get_peft_model(copy.deepcopy(base), lora)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters a non-zero delta
        for key, param in reference.named_parameters():
            if "lora_B" in key:
                param.normal_(0, 0.1)
    if order == "patch_then_wrap":
        model = peft.get_peft_model(patch(copy.deepcopy(base)), copy.deepcopy(lora))
    else:
        model = patch(peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(lora)))
    model.load_state_dict(reference.state_dict())
    assert is_patched(model)
    input_ids, attention_mask, labels = batch()
    own, own_grads = loss_and_grads(reference, input_ids, attention_mask=attention_mask, labels=labels)
    ours, our_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels)
    assert our_grads and all("lora_" in key for key in our_grads)  # only the adapters train
    assert_same_training_signal(own, own_grads, ours, our_grads)


def test_peft_lora_on_the_head_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("LlamaForCausalLM"),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(TypeError, match="PEFT adapter"):
        patch(model)


def test_peft_modules_to_save_trains_the_heads_copy():
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    reference = peft.get_peft_model(build("LlamaForCausalLM"), lora)
    with torch.no_grad():  # the trained copy differs from the frozen original
        reference.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    model = patch(copy.deepcopy(reference))
    input_ids, attention_mask, labels = batch()
    own, own_grads = loss_and_grads(reference, input_ids, attention_mask=attention_mask, labels=labels)
    ours, our_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels)
    assert any("modules_to_save.default" in key for key in our_grads)
    assert_same_training_signal(own, own_grads, ours, our_grads)
    # adapters disabled: the frozen original head again (nothing requires a gradient then)
    with torch.no_grad(), model.disable_adapter(), reference.disable_adapter():
        own = reference(input_ids, attention_mask=attention_mask, labels=labels).loss
        ours = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    assert abs(ours.item() - own.item()) <= LOSS_RTOL * own.item()


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, rows=8, length=10):
        g = torch.Generator().manual_seed(1)
        self.items = []
        for row in range(rows):
            ids = torch.randint(1, VOCAB, (length,), generator=g)
            mask = torch.ones(length, dtype=torch.long)
            mask[length - (row % 4) * 2:] = 0  # 0, 2, 4, 6 padded positions: micro-batches differ in size
            ids = ids.masked_fill(mask == 0, 0)
            self.items.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def _train(model, tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_TokenDataset())
    assert trainer.model_accepts_loss_kwargs  # so num_items_in_batch reaches the forward
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_with_gradient_accumulation_equals_the_unpatched_run(tmp_path):
    base = build("LlamaForCausalLM")
    own_model, our_model = copy.deepcopy(base), patch(copy.deepcopy(base))
    own_losses = _train(own_model, tmp_path / "own")
    our_losses = _train(our_model, tmp_path / "ours")
    assert len(own_losses) == len(our_losses) == 2
    for own, ours in zip(own_losses, our_losses):
        assert math.isclose(ours, own, rel_tol=LOSS_RTOL)
    own_params = dict(own_model.named_parameters())
    for key, param in our_model.named_parameters():
        # two SGD steps: a parameter moves by lr × its gradient, so it differs by lr × the gradient error
        delta = (own_params[key] - base.get_parameter(key)).detach()
        error = (param - own_params[key]).detach().abs().max().item()
        assert error <= GRAD_RTOL * delta.abs().max().item() + 1e-7, key


# ---------------------------------------------------------------------------------- torch.compile
def _compiled_parity(backend):
    model = build("LlamaForCausalLM", num_hidden_layers=1)
    input_ids, attention_mask, labels = batch()
    own, own_grads = loss_and_grads(model, input_ids, attention_mask=attention_mask, labels=labels)
    compiled = torch.compile(patch(model), backend=backend)
    for _ in range(2):  # the second call reuses the compiled graph
        ours, our_grads = loss_and_grads(compiled, input_ids, attention_mask=attention_mask, labels=labels)
        assert ours.logits is None
        assert_same_training_signal(own, own_grads, ours, {k.removeprefix("_orig_mod."): v
                                                           for k, v in our_grads.items()})
    with torch.no_grad():  # generation/eval path through the compiled model (Inductor may reorder sums)
        logits = compiled(input_ids, attention_mask=attention_mask).logits
        expected = unpatch(copy.deepcopy(model))(input_ids, attention_mask=attention_mask).logits
        assert relative_error(logits, expected) <= LOSS_RTOL


def test_torch_compile_of_the_whole_patched_model():
    torch._dynamo.reset()
    _compiled_parity("inductor")


def test_torch_compile_traces_the_patch_aot_eager():
    torch._dynamo.reset()
    _compiled_parity("aot_eager")


def test_without_transformers_patch_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(ImportError, match=r"softmaxkit\[transformers\]"):
        patch(torch.nn.Linear(2, 2))
