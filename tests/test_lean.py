"""Lean activations (exoalign/lean.py) and the in-place logits gradient: same numbers, fewer saved tensors."""

from __future__ import annotations

import pytest
import torch
from numerics import EPS, assert_close_scaled, rel_tol
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from exoalign.lean import _RMSNorm, _SwiGLUDown, apply_lean_activations, remove_lean_activations
from exoalign.logprobs import _reusable, logits_grad_in_place, sequence_logps, token_logps


def _llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # norm weights away from 1, so that a wrong weight gradient shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids).logits
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * w).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_swiglu_and_rmsnorm_gradcheck() -> None:
    """The hand-written backwards against numerical differences (float64)."""
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _SwiGLUDown.apply(*a), (gate, up, w, b))
    assert torch.autograd.gradcheck(lambda *a: _SwiGLUDown.apply(*a, None), (gate, up, w))
    # RMSNorm computes in fp32 by definition (as Llama's does): check it against its own fp32 formula instead.
    x = torch.randn(2, 3, 6, generator=g, requires_grad=True)
    wn = (1 + 0.3 * torch.randn(6, generator=g)).requires_grad_()
    y = _RMSNorm.apply(x, wn, 1e-6)
    ref = wn * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    gy = torch.randn(y.shape, generator=g)
    ga = torch.autograd.grad((y * gy).sum(), [x, wn])
    gr = torch.autograd.grad((ref * gy).sum(), [x, wn])
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    for name, a, r in zip(("x", "w"), ga, gr, strict=True):  # fp32, reductions over 6 features and 6 rows
        assert_close_scaled(a, r, rel_tol(torch.float32, 6), what=f"grad {name}")


def test_lean_llama_equals_plain_and_saves_memory() -> None:
    """Patched Llama: identical logits, gradients to 1e-5 relative, fewer bytes saved for backward; removable."""
    model = _llama()
    ids = torch.randint(0, 120, (3, 24), generator=torch.Generator().manual_seed(1))

    def saved_bytes() -> int:
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids).logits.sum()
        return total[0]

    plain_out, plain_g = _grads(model, ids)
    plain_bytes = saved_bytes()
    assert apply_lean_activations(model) == {"mlp": 2, "norm": 5}
    assert apply_lean_activations(model) == {"mlp": 2, "norm": 5}  # idempotent
    lean_out, lean_g = _grads(model, ids)
    lean_bytes = saved_bytes()
    torch.testing.assert_close(lean_out, plain_out, rtol=0, atol=0)
    # the recomputed backward rounds in another order: fp32, reductions over the 24 positions × 3 rows and the
    # intermediate size, relative to each gradient's largest element
    assert_close_scaled(lean_g, plain_g, rel_tol(torch.float32, 3 * 24 * 80), what="lean grad")
    # Per MLP the lean form drops silu(gate) and the product (2 × intermediate), per norm its normalised copy.
    assert lean_bytes < 0.8 * plain_bytes, (lean_bytes, plain_bytes)
    remove_lean_activations(model)
    assert not any("_lean_forward" in m.__dict__ for m in model.modules())
    again_out, _ = _grads(model, ids)
    torch.testing.assert_close(again_out, plain_out, rtol=0, atol=0)


def test_lean_survives_mode_changes_of_a_loaded_model(tmp_path) -> None:
    """A model loaded by ``from_pretrained`` (transformers ≥ 5 kernelizes it again on every ``train()``/``eval()``,
    dropping instance-level forwards of its RMSNorms) keeps its lean MLPs and norms through ``eval()`` and
    ``train()`` — what every probe and evaluation does mid-run — and a pickled copy keeps them too."""
    import io

    from exoalign.models import load_causal_lm

    _llama().save_pretrained(tmp_path)
    model = load_causal_lm(str(tmp_path))
    model.train()
    assert apply_lean_activations(model) == {"mlp": 2, "norm": 5}
    model.eval()
    model.train()
    ids = torch.randint(0, 120, (2, 10), generator=torch.Generator().manual_seed(3))

    def backward_nodes(m: torch.nn.Module) -> set[str]:
        seen, stack, names = set(), [m(input_ids=ids).logits.sum().grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            names.add(node.name())
            stack.extend(f for f, _ in node.next_functions)
        return names

    nodes = backward_nodes(model)
    assert {"_RMSNormBackward", "_SwiGLUDownBackward"} <= nodes and "PowBackward0" not in nodes, sorted(nodes)
    assert "LeanLlamaRMSNorm" in repr(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copy = torch.load(buf, weights_only=False)
    assert "_RMSNormBackward" in backward_nodes(copy)
    remove_lean_activations(model)
    model.eval()
    model.train()
    assert "PowBackward0" in backward_nodes(model) and "_RMSNormBackward" not in backward_nodes(model)


def test_a_module_whose_forward_was_replaced_is_left_alone() -> None:
    """A hub kernel or an offloading hook that set a module's own ``forward`` keeps it: that module is not patched."""
    model = _llama()
    hook = model.model.norm.forward
    model.model.norm.forward = lambda x: hook(x)
    assert apply_lean_activations(model) == {"mlp": 2, "norm": 4}
    assert type(model.model.norm).__name__ == "LlamaRMSNorm" and "forward" in model.model.norm.__dict__


def test_lean_bf16_autocast_close_to_plain() -> None:
    """Under bf16 autocast the lean MLP computes in bf16 like autocast's linear; parameter grads stay fp32."""
    model = _llama()
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_out, plain_g = _grads(model, ids)
        apply_lean_activations(model)
        lean_out, lean_g = _grads(model, ids)
    assert all(g.dtype == torch.float32 for g in lean_g.values())
    # both in bf16 autocast (unit roundoff u = 2^-8 on every matmul input), the lean MLP's elementwise part in
    # bf16 as well: outputs within a few u of the largest logit, gradients within √(depth)·few u of their largest
    u = EPS[torch.bfloat16] / 2
    assert_close_scaled(lean_out.float(), plain_out.float(), 4 * u, what="bf16 logits")
    assert_close_scaled(lean_g, plain_g, 16 * u, what="bf16 grad")


def test_modules_that_differ_keep_their_forward() -> None:
    """GPT-2 (GELU MLP, LayerNorm) is not touched; a Gemma-style (1 + w) norm fails the probe."""
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    assert apply_lean_activations(gpt2) == {"mlp": 0, "norm": 0}

    class OnePlusRMSNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(8))
            self.eps = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    holder = torch.nn.Sequential(OnePlusRMSNorm())
    assert apply_lean_activations(holder) == {"mlp": 0, "norm": 0}


def test_training_step_with_and_without_lean_matches() -> None:
    """One loss + backward through sequence_logps on a patched and an unpatched copy: equal to 1e-5."""
    ids = torch.randint(2, 120, (4, 12), generator=torch.Generator().manual_seed(3))
    am = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :5] = -100
    results = []
    for lean in (False, True):
        model = _llama(seed=7)
        if lean:
            apply_lean_activations(model)
        lp, _ = sequence_logps(model, ids, am, labels)
        lp.sum().backward()
        results.append((lp.detach(), model.model.layers[0].mlp.down_proj.weight.grad.clone(),
                        model.model.norm.weight.grad.clone()))
    for name, a, b in zip(("logps", "down_proj", "norm"), *results, strict=True):
        assert_close_scaled(a, b, rel_tol(torch.float32, 4 * 12 * 120), what=name)  # fp32, rows × positions × vocab


def test_logits_gradient_written_in_place_only_when_safe() -> None:
    """Logits straight from a matmul are reused for their gradient; logits another op keeps get a buffer."""
    torch.manual_seed(0)
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    tgt = torch.randint(0, 30, (6,))
    plain = h @ w.t()
    assert _reusable(plain) and _reusable((h @ w.t()).view(3, 2, 30))
    soft = torch.tanh(plain)  # tanh keeps its output for backward
    assert not _reusable(soft)
    ref_h, ref_w = torch.autograd.grad(((h @ w.t()).log_softmax(-1)[torch.arange(6), tgt]).sum(), [h, w])
    with logits_grad_in_place():
        logits = h @ w.t()
        out = token_logps(logits, tgt)
    got_h, got_w = torch.autograd.grad(out.sum(), [h, w])
    tol = rel_tol(torch.float32, 30)  # fp32 softmax over 30 logits, gradients through an 8-wide matmul
    assert_close_scaled(got_h, ref_h, tol, what="grad h")
    assert_close_scaled(got_w, ref_w, tol, what="grad w")
    assert logits._version > 0  # the gradient really went into the logits' storage
    # Tanh-capped logits: correct gradient through tanh (the logits were not overwritten).
    ref = torch.autograd.grad((torch.tanh(h @ w.t()).log_softmax(-1)[torch.arange(6), tgt]).sum(), [h])[0]
    with logits_grad_in_place():
        out = token_logps(torch.tanh(h @ w.t()), tgt)
    assert_close_scaled(torch.autograd.grad(out.sum(), [h])[0], ref, tol, what="grad h through tanh")


def test_logits_kept_by_default_so_the_graph_can_be_reused() -> None:
    """Outside the training loop's block, two backwards through the same log-probs (retain_graph) both work."""
    torch.manual_seed(1)
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    lp = token_logps(h @ w.t(), torch.randint(0, 20, (5,)))
    g1 = torch.autograd.grad(lp.sum(), [h], retain_graph=True)[0]
    g2 = torch.autograd.grad((2 * lp).sum(), [h])[0]
    torch.testing.assert_close(g2, 2 * g1)
    with logits_grad_in_place():
        lp = token_logps(h @ w.t(), torch.randint(0, 20, (5,)))
    torch.autograd.grad(lp.sum(), [h], retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):  # loud, never a silently wrong gradient
        torch.autograd.grad(lp.sum(), [h])


@pytest.mark.parametrize("lean", [False, True])
def test_train_config_switch(lean: bool, tmp_path) -> None:
    """``train.lean_activations`` exists, defaults to on, and is a plain bool in the config."""
    from exoalign.train.config import TrainArgs

    assert TrainArgs(output_dir=str(tmp_path)).lean_activations is True
    assert TrainArgs(output_dir=str(tmp_path), lean_activations=lean).lean_activations is lean


def test_rotary_function_gradcheck_and_form() -> None:
    """:class:`_Rotary` against numerical differences (float64) and against transformers' Llama rotary."""
    from transformers.models.llama import modeling_llama

    from exoalign.lean import _Rotary

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = (torch.randn(2, 1, 4, 6, generator=g, dtype=torch.float64) for _ in range(2))
    assert torch.autograd.gradcheck(lambda t: _Rotary.apply(t, cos, sin), (x,))
    want = x * cos + modeling_llama.rotate_half(x) * sin
    assert_close_scaled(_Rotary.apply(x, cos, sin), want, rel_tol(torch.float64, 2), what="rotary")


def test_fast_rotary_inside_training_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the training step's block Llama's rotary runs through :class:`_Rotary` with the same outputs and
    gradients (fp32), transformers' function is back afterwards, and a rotary of another form (interleaved pairs,
    GPT-J's) fails the probe and is left alone."""
    import sys
    import types

    from transformers.models.llama import modeling_llama

    from exoalign.attention import training_attention
    from exoalign.lean import _rotary_probe

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    fake = types.ModuleType("transformers.models.fake_interleaved.modeling_fake_interleaved")
    fake.apply_rotary_pos_emb = interleaved
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    assert not _rotary_probe(interleaved)
    original = modeling_llama.apply_rotary_pos_emb
    ids = torch.randint(2, 120, (3, 10), generator=torch.Generator().manual_seed(4))
    results = []
    for inside in (False, True):
        model = _llama(seed=9)
        if inside:
            with training_attention():
                assert modeling_llama.apply_rotary_pos_emb is not original
                assert fake.apply_rotary_pos_emb is interleaved
                out, grads = _grads(model, ids)
        else:
            out, grads = _grads(model, ids)
        results.append((out, grads))
    assert modeling_llama.apply_rotary_pos_emb is original
    (o0, g0), (o1, g1) = results
    tol = rel_tol(torch.float32, 120)  # fp32, a vocabulary-wide head after two 32-wide layers
    assert_close_scaled(o1, o0, tol, what="logits")
    assert_close_scaled(g1, g0, tol, what="grads")
