"""Prompt sharing (exoalign.packing): the shared layout gives the unshared log-probs and gradients."""

from __future__ import annotations

import pytest
import torch
from numerics import EPS, assert_close_scaled, rel_tol

from exoalign.logprobs import autocast, sequence_logps
from exoalign.models import build_model, tiny_config
from exoalign.packing import (
    collate_groups,
    group_logps,
    pack_shared_prefix,
    shared_prefix_logps,
    shared_prefix_mask,
    supports_shared_prefix,
)

VOCAB = 64
# Shared and unshared layouts run the same fp32 model with other matmul shapes and attention masks: values differ
# by rounding of reductions over the hidden size and the vocabulary (<= 64 terms) per token.
LOGP_TOL = rel_tol(torch.float32, VOCAB)


def make_model(model_type: str, impl: str = "sdpa") -> torch.nn.Module:
    kw = {}
    if model_type == "llama":  # grouped-query attention and rotary positions
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    config = tiny_config(VOCAB, model_type=model_type, bos_token_id=0, eos_token_id=0, pad_token_id=1, **kw)
    config._attn_implementation = impl
    return build_model(config, seed=0)


def ragged_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """3 groups, K = 3: prompts of 5, 3 and 7 tokens; completions of 1 to 6 tokens; two groups have empty slots."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(2, VOCAB, (n,), generator=g).tolist()

    return collate_groups([ids(5), ids(3), ids(7)], [[ids(4), ids(2), ids(6)], [ids(3)], [ids(1), ids(5)]], pad_id=1)


def naive_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Each row on its own, without padding, through the full log-softmax: the slow reference. (B*K,)"""
    out = []
    for ids, am, lab in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        keep = am.bool()
        x, y = ids[keep][None], lab[keep]
        logp = (model(x).logits[0, :-1] / temperature).log_softmax(-1)  # (n - 1, V)
        t = y[1:]
        m = t != -100
        out.append(logp[m].gather(-1, t[m, None]).sum())
    return torch.stack(out)


def grads(model: torch.nn.Module, value: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    value.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_shared_equals_unshared_values_and_gradients(model_type: str, impl: str) -> None:
    model = make_model(model_type, impl)
    assert supports_shared_prefix(model)
    batch = ragged_batch()
    weights = torch.randn(3, 3, generator=torch.Generator().manual_seed(2))  # a loss that weighs every slot

    shared, lengths = shared_prefix_logps(model, batch, temperature=0.8)
    unshared, n_unshared = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                          temperature=0.8)
    slow = naive_logps(model, batch, temperature=0.8)

    assert shared.shape == (3, 3) and shared.dtype == torch.float32
    assert_close_scaled(shared.flatten(), unshared, LOGP_TOL, what="shared vs unshared")
    assert_close_scaled(shared.flatten(), slow, LOGP_TOL, what="shared vs naive")
    assert lengths.tolist() == [[4, 2, 6], [3, 0, 0], [1, 5, 0]] == n_unshared.view(3, 3).tolist()
    assert shared[1, 1] == 0 and shared[2, 2] == 0  # empty slots
    assert bool((shared[batch["group_mask"]] < 0).all())

    g_shared = grads(model, (shared * weights).sum())
    g_slow = grads(model, (slow.view(3, 3) * weights).sum())
    for i, (a, b) in enumerate(zip(g_shared, g_slow)):
        assert_close_scaled(a, b, LOGP_TOL, what=f"grad of parameter {i}")


def test_group_collator_batches_with_missing_slots() -> None:
    """The trainer's collator puts the prompt into missing slots; those rows are dropped, not scored."""
    from exoalign.data import GroupCollator

    model = make_model("gpt2")
    feats = [
        {"index": 0, "prompt_ids": [5, 6, 7], "completion_ids": [[8, 9, 0], [10, 0], [11, 12, 13, 0]]},
        {"index": 1, "prompt_ids": [14, 15, 16, 17, 18], "completion_ids": [[19, 0]]},
    ]
    batch = GroupCollator(1)(feats)
    shared, lengths = group_logps(model, batch, prefix_sharing=True)
    plain, plain_lengths = group_logps(model, batch, prefix_sharing=False)
    assert_close_scaled(shared, plain.masked_fill(~batch["group_mask"], 0.0), LOGP_TOL, what="shared vs plain")
    assert lengths.tolist() == batch["lengths"].tolist() == plain_lengths.tolist()
    assert shared[1, 1:].tolist() == [0.0, 0.0]


def test_packed_layout_by_hand() -> None:
    """Group 0: prompt [5 6], completions [7 8] and [9]. Group 1: prompt [4], completion [3 2]; slot 1 empty.

    Collated (P = 2, C = 2):  [5 6 | 7 8], [5 6 | 9 .], [. 4 | 3 2], [. 4 | . .] (empty slot: prompt only)
    Shared rows (L = P + max(2 + 1, 2) = 5):
        ids       [5 6 7 8 9]     [. 4 3 2 .]
        segments  [0 0 1 1 2]     [-1 0 1 1 -1]
        positions [0 1 2 3 2]     [0 0 1 2 0]
    Tokens 7, 9 are predicted from column 1 (the prompt's end), 8 from column 2; 3 from column 1, 2 from 2.
    """
    batch = collate_groups([[5, 6], [4]], [[[7, 8], [9]], [[3, 2]]], pad_id=0)
    p = pack_shared_prefix(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["group_mask"])
    assert p.prompt_end == 2
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9], [0, 4, 3, 2, 0]]
    assert p.segments.tolist() == [[0, 0, 1, 1, 2], [-1, 0, 1, 1, -1]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 0, 1, 2, 0]]
    assert p.predict.tolist() == [[False, True, True, False, False], [False, True, True, False, False]]
    # predicting rows among the True positions: (0,1)=0, (0,2)=1, (1,1)=2, (1,2)=3
    assert p.targets.tolist() == [7, 8, 9, 3, 2]
    assert p.pred_index.tolist() == [0, 1, 0, 2, 3]
    assert p.slots.tolist() == [0, 0, 1, 2, 2]
    assert p.lengths.tolist() == [[2, 1], [2, 0]]


def test_mask_by_hand() -> None:
    """Segments [0 0 1 1 2]: completion 2's token sees the prompt and itself, not completion 1."""
    seg = torch.tensor([[0, 0, 1, 1, 2], [-1, 0, 1, -1, -1]])
    m = shared_prefix_mask(seg)[:, 0].int().tolist()
    assert m[0] == [[1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [1, 1, 1, 0, 0],
                    [1, 1, 1, 1, 0],
                    [1, 1, 0, 0, 1]]
    assert m[1] == [[1, 0, 0, 0, 0],  # padding sees itself only (no empty softmax row)
                    [0, 1, 0, 0, 0],
                    [0, 1, 1, 0, 0],
                    [0, 1, 0, 1, 0],
                    [0, 1, 0, 0, 1]]
    additive = shared_prefix_mask(seg, torch.float32)
    assert additive[0, 0, 4, 2] == torch.finfo(torch.float32).min and additive[0, 0, 4, 1] == 0


def test_rows_of_a_group_must_share_the_prompt() -> None:
    batch = collate_groups([[5, 6], [4]], [[[7, 8], [9]], [[3, 2]]], pad_id=0)
    batch["input_ids"][1, 1] = 11  # slot 1 of group 0 now has another prompt
    with pytest.raises(ValueError, match="same prompt"):
        pack_shared_prefix(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["group_mask"])


def test_fallback_for_attention_without_custom_masks() -> None:
    """A config-level exclusion (FlashAttention 2) and a model that silently drops 4-D masks both fall back."""
    model = make_model("gpt2")
    batch = ragged_batch()
    expected = naive_logps(model, batch).view(3, 3).detach()

    model.config._attn_implementation = "flash_attention_2"
    assert not supports_shared_prefix(model)
    model.config._attn_implementation = "sdpa"

    class DropsMasks(type(model)):
        """Attends causally across the whole row whatever mask it is given (as some custom models do)."""

        def forward(self, *args, attention_mask=None, **kwargs):
            if attention_mask is not None and attention_mask.dim() == 4:
                attention_mask = None
            return super().forward(*args, attention_mask=attention_mask, **kwargs)

    bad = DropsMasks(model.config)
    bad.load_state_dict(model.state_dict())
    assert not supports_shared_prefix(bad)  # the probe sees other numbers
    out, _ = shared_prefix_logps(bad, batch)
    assert_close_scaled(out, expected.masked_fill(~batch["group_mask"], 0.0), LOGP_TOL, what="fallback")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bf16_autocast(impl: str) -> None:
    """Under bf16 autocast the shared layout stays within bf16 rounding of the unshared one, in fp32 output."""
    model = make_model("gpt2", impl)
    batch = ragged_batch()
    with autocast("bf16", "cpu"):
        shared, _ = group_logps(model, batch, prefix_sharing=True)
        plain, _ = group_logps(model, batch, prefix_sharing=False)
    exact, _ = group_logps(model, batch, prefix_sharing=False)
    assert shared.dtype == torch.float32
    # autocast rounds each matmul's inputs to bf16 (unit roundoff u = EPS/2 = 2^-8, relative); the log-probs are
    # then accumulated in fp32, so a sequence log-prob moves by about u of its own size: within u of the largest
    # one between two bf16 layouts, within 2u = EPS of the fp32 value.
    u = EPS[torch.bfloat16] / 2
    assert_close_scaled(shared, plain, u, what="bf16 shared vs plain")
    assert_close_scaled(shared, exact, 2 * u, what="bf16 vs fp32")
    assert float((shared - exact).detach().abs().max()) > 0  # autocast really ran in bf16


def test_probes_run_once_per_architecture_and_leave_the_model_as_found() -> None:
    """The one-off probes leave the model in its mode with its forward; a model of the same architecture loaded
    again in the same process reuses the verdict instead of probing again; another class or attention
    implementation is probed anew."""
    from exoalign.lean import apply_lean_activations
    from exoalign.logprobs import chunked_head_supported, probing, structure_key

    def build(impl: str = "sdpa") -> torch.nn.Module:  # an architecture no other test of this process probes
        config = tiny_config(VOCAB, model_type="llama", bos_token_id=0, eos_token_id=0, pad_token_id=1,
                             hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=96)
        config._attn_implementation = impl
        return build_model(config, seed=0)

    model = build().train()
    forward = model.forward
    with probing(model):
        assert not model.training and not torch.is_grad_enabled()
    assert model.training and torch.is_grad_enabled() and model.forward == forward
    calls: list[int] = []
    model.register_forward_hook(lambda *a: calls.append(1))
    assert supports_shared_prefix(model) and chunked_head_supported(model)
    assert calls and model.training  # probed, and back in training mode
    calls.clear()

    again = build()  # same architecture, other object, lean activations on: no probe forward at all
    assert apply_lean_activations(again)["norm"] > 0
    assert structure_key(again) == structure_key(model)
    again.register_forward_hook(lambda *a: calls.append(1))
    assert supports_shared_prefix(again) and chunked_head_supported(again)
    assert calls == []

    eager = build("eager")  # another attention implementation: probed
    assert structure_key(eager) != structure_key(model)
    eager.register_forward_hook(lambda *a: calls.append(1))
    assert supports_shared_prefix(eager)
    assert calls


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_long_shared_rows_attend_segment_by_segment(model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of >= SEGMENTED_MIN_LENGTH columns inside the training attention block: the prompt block and the
    completion columns are attended in two parts (exoalign.attention.SharedLayout), with the dense attention's
    values and gradients, which equal the unshared rows'. Ragged prompts (left padding), completions of 1 to 60
    tokens, an empty slot; then prompts without padding (the causal fast path of the prompt block)."""
    from exoalign import attention
    from exoalign.attention import SEGMENTED_MIN_LENGTH, training_attention

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2 if model_type == "llama" else 4, max_position_embeddings=512)
    if model_type == "gpt2":
        kw = dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)
    config = tiny_config(VOCAB, model_type=model_type, bos_token_id=0, eos_token_id=0, pad_token_id=1, **kw)
    config._attn_implementation = "sdpa"
    model = build_model(config, seed=0)
    g = torch.Generator().manual_seed(5)

    def ids(n: int) -> list[int]:
        return torch.randint(2, VOCAB, (n,), generator=g).tolist()

    batch = collate_groups([ids(190), ids(150)], [[ids(60), ids(1), ids(33)], [ids(47), ids(12)]], pad_id=1)
    assert batch["input_ids"].shape[1] - 0 >= 190 and batch["group_mask"].sum() == 5
    calls: list[int] = []
    real_attr = attention.LAYOUT_ATTR
    real = attention.SharedLayout.attend
    monkeypatch.setattr(attention.SharedLayout, "attend", lambda self, *a: calls.append(1) or real(self, *a))
    split: list[int] = []
    monkeypatch.setattr(attention, "SPLIT_MAX_RATIO", float("inf"))  # the split on these short rows too
    real_split = attention._CompletionAttention.forward
    monkeypatch.setattr(attention._CompletionAttention, "forward",
                        staticmethod(lambda ctx, *a: split.append(1) or real_split(ctx, *a)))

    def run(strip: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if strip:  # the dense attention over the same shared rows
            monkeypatch.setattr(attention, "LAYOUT_ATTR", "_not_attached")
        with training_attention():
            out, _ = shared_prefix_logps(model, batch)
            value = (out * batch["group_mask"]).sum()
            return out.detach(), grads(model, value)

    seg, seg_grads = run(strip=False)
    assert len(calls) == 2  # one per layer: the segmented path served every layer
    assert len(split) == 2  # and its completion columns went through the split attention (fp32)
    dense, dense_grads = run(strip=True)
    assert len(calls) == 2
    gm = batch["group_mask"]
    L = 190 + 60 + 1 + 33
    assert L >= SEGMENTED_MIN_LENGTH
    tol = rel_tol(torch.float32, L)  # other reduction orders over up to L keys and the 64-token vocabulary
    assert_close_scaled(seg[gm], dense[gm], tol, what="segmented vs dense log-probs")
    expected = naive_logps(model, batch).view(gm.shape).detach()
    assert_close_scaled(seg[gm], expected[gm], tol, what="segmented vs unshared log-probs")
    for a, b in zip(seg_grads, dense_grads):
        assert_close_scaled(a, b, tol, what="segmented vs dense gradients")

    batch = collate_groups([ids(200), ids(200)], [[ids(30), ids(40)], [ids(50), ids(9)]], pad_id=1)
    monkeypatch.setattr(attention, "LAYOUT_ATTR", real_attr)
    seg, seg_grads = run(strip=False)
    assert len(calls) == 4
    dense, dense_grads = run(strip=True)
    assert_close_scaled(seg, dense, tol, what="segmented (causal prompt) vs dense log-probs")
    for a, b in zip(seg_grads, dense_grads):
        assert_close_scaled(a, b, tol, what="segmented (causal prompt) vs dense gradients")
