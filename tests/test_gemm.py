"""fp32 products through oneDNN (exoalign/gemm.py): the same values and gradients as ``F.linear`` up to fp32
rounding, the fallbacks that must stay ``F.linear`` exactly, and the model patch.

The oneDNN path is forced with ``EXOALIGN_FP32_MATMUL=onednn``, so it is tested on every CPU (``auto`` takes it
only on AMD processors with AVX-512). Tolerances: the two kernels sum a length-``K`` product in different orders,
so an output differs by at most ~``K·u·Σ|x||w|`` (``u`` = fp32 epsilon); :func:`_bound` states that bound per
element, and the tests allow 4× it (the backward's products chain two such sums).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from numerics import EPS
from refs import alive_without_collector
from transformers import LlamaConfig, LlamaForCausalLM

from exoalign import gemm
from exoalign.errors import InputError

pytestmark = pytest.mark.skipif(not gemm._onednn_available(), reason="this torch has no oneDNN (mkldnn) linear")


@pytest.fixture
def onednn(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Force the oneDNN path and count its products."""
    monkeypatch.setenv(gemm.ENV, "onednn")
    calls = [0]
    real = gemm._lin

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(gemm, "_lin", counted)
    return calls


def _bound(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Per-element rounding bound of ``a @ b_tᵀ`` in fp32 summed in any order: ``K · u · (|a| @ |b_t|ᵀ)``."""
    k = a.shape[-1]
    return k * EPS[torch.float32] * (a.abs().double() @ b_t.abs().double().t())


def _assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    diff = (actual.double() - expected.double()).abs()
    worst = float((diff - 4 * bound).max())
    assert worst <= 0, f"{what}: |diff| exceeds 4× the rounding bound by {worst:.3g} (max diff {float(diff.max()):.3g})"


def test_choice_reads_the_environment() -> None:
    assert gemm.choice({}) == "auto"
    assert gemm.choice({gemm.ENV: " ONEDNN "}) == "onednn"
    assert gemm.choice({gemm.ENV: "aten"}) == "aten"
    with pytest.raises(InputError) as err:
        gemm.choice({gemm.ENV: "blas"})
    line = str(err.value)
    assert gemm.ENV in line and "onednn" in line and "\n" not in line


def test_auto_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto``: oneDNN on AMD with AVX-512 only; ``aten`` never."""
    gemm._decide.cache_clear()
    try:
        for vendor, flags, expected in (("AuthenticAMD", {"avx2", "avx512f"}, True),
                                        ("AuthenticAMD", {"avx2"}, False),
                                        ("GenuineIntel", {"avx2", "avx512f"}, False)):
            monkeypatch.setattr(gemm, "_cpu_info", lambda v=vendor, f=flags: (v, f))
            gemm._decide.cache_clear()
            assert gemm._decide("auto") is expected, (vendor, flags)
            assert gemm._decide("aten") is False
            assert gemm._decide("onednn") is True
    finally:
        gemm._decide.cache_clear()


@pytest.mark.parametrize("shape,bias", [((3, 40, 96), True), ((300, 64), False)])
def test_linear_matches_f_linear(onednn: list[int], shape: tuple[int, ...], bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(700, shape[-1], generator=g)
    b = torch.randn(700, generator=g) if bias else None
    dy = torch.randn(*shape[:-1], 700, generator=g)
    outs = []
    for fast in (True, False):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        bi = b.clone().requires_grad_(True) if b is not None else None
        y = gemm.linear(xi, wi, bi) if fast else F.linear(xi, wi, bi)
        y.backward(dy)
        outs.append((y.detach(), xi.grad, wi.grad, bi.grad if bi is not None else None))
    assert onednn[0] == 2  # the forward and the input gradient; the weight gradient stays with torch
    (y1, dx1, dw1, db1), (y0, dx0, dw0, db0) = outs
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, 700)
    _assert_within(y1.reshape(-1, 700), y0.reshape(-1, 700), _bound(x2, w), "output")
    _assert_within(dx1.reshape(x2.shape), dx0.reshape(x2.shape), _bound(dy2, w.t()), "input gradient")
    _assert_within(dw1, dw0, _bound(dy2.t(), x2.t()), "weight gradient")
    if bias:
        assert torch.equal(db1, db0) or float((db1 - db0).abs().max()) <= 4 * x2.shape[0] * EPS[torch.float32] * float(
            dy2.abs().sum(0).max())
    assert y1.shape == y0.shape and dx1.shape == x.shape


def test_linear_without_grad_and_non_contiguous_input(onednn: list[int]) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 300, generator=g)
    x = base.t()  # (300, 64), not contiguous
    w = torch.randn(512, 64, generator=g)
    with torch.no_grad():
        y = gemm.linear(x, w)
    assert onednn[0] == 1 and not y.requires_grad
    _assert_within(y, F.linear(x, w), _bound(x, w), "output")


def test_fallbacks_are_f_linear_itself(onednn: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Small products, bf16, autocast and ``aten`` go to ``F.linear`` (bit for bit, no oneDNN call)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 32, generator=g)
    small = torch.randn(gemm.MIN_ROWS - 1, 32, generator=g)  # too few rows
    narrow = torch.randn(64, 32, generator=g)  # 64 × 16 outputs < MIN_OUTPUTS
    assert torch.equal(gemm.linear(small, w), F.linear(small, w))
    assert torch.equal(gemm.linear(narrow, w), F.linear(narrow, w))
    big = torch.randn(400, 32, generator=g)
    wide = torch.randn(400, 32, generator=g)
    assert torch.equal(gemm.linear(big.bfloat16(), wide.bfloat16()), F.linear(big.bfloat16(), wide.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(gemm.linear(big, wide), F.linear(big, wide))
    assert onednn[0] == 0
    monkeypatch.setenv(gemm.ENV, "aten")
    assert torch.equal(gemm.linear(big, wide), F.linear(big, wide))
    assert onednn[0] == 0
    monkeypatch.setenv(gemm.ENV, "onednn")
    gemm.linear(big, wide)
    assert onednn[0] == 1


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=600, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def test_apply_fast_linear_model(onednn: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    from exoalign.lean import apply_lean_activations

    model, plain = _model(), _model()
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert gemm.apply_fast_linear(model) == n_linear
    assert gemm.apply_fast_linear(model) == 0  # idempotent
    apply_lean_activations(model)
    apply_lean_activations(plain)
    assert list(model.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 600, (4, 40), generator=torch.Generator().manual_seed(3))
    outs = []
    for m in (model, plain):
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append((out.logits.detach(), {n: p.grad for n, p in m.named_parameters()}))
    assert onednn[0] > 0
    (l1, g1), (l0, g0) = outs
    # Two layers of K ≤ 160 products: relative rounding of a few K·u, far below a wrong result's size.
    tol = 64 * 160 * EPS[torch.float32]
    assert float((l1 - l0).abs().max()) <= tol * float(l0.abs().max())
    for name in g0:
        assert float((g1[name] - g0[name]).abs().max()) <= tol * float(g0[name].abs().max()), name
    twin = copy.deepcopy(model)  # a deep copy's patched forwards belong to the copy's modules
    q = twin.model.layers[0].self_attn.q_proj
    assert q.forward.module is q
    buf = io.BytesIO()  # and a patched model pickles whole
    torch.save(model, buf)
    buf.seek(0)
    q = torch.load(buf, weights_only=False).model.layers[0].self_attn.q_proj
    assert q.forward.module is q
    gemm.remove_fast_linear(model)
    assert not any("forward" in m.__dict__ for m in model.modules() if type(m) is torch.nn.Linear)
    monkeypatch.setenv(gemm.ENV, "aten")
    assert gemm.apply_fast_linear(_model()) == 0


def test_a_patched_model_is_freed_without_the_cycle_collector(onednn: list[int]) -> None:
    """A patched layer's forward reaches its module weakly: dropping the model frees every layer (and its weights)
    by reference counting alone, as for an unpatched model. A strong reference made layer → forward → layer a
    cycle that kept each dropped model's weights until Python's next full collection."""
    model = _model()
    assert gemm.apply_fast_linear(model) > 0
    forward = model.model.layers[0].mlp.up_proj.forward
    holder = [model]
    del model
    alive, n = alive_without_collector(holder, lambda m: [x for x in m.modules() if type(x) is torch.nn.Linear])
    assert alive == 0, f"{alive} of {n} patched layers outlived their model"
    with pytest.raises(RuntimeError, match="its module was freed"):
        forward(torch.randn(2, 64))


def test_chunked_head_through_onednn(onednn: list[int]) -> None:
    """The chunked head's logits products go through oneDNN; its log-probs and gradients stay equal."""
    from exoalign.logprobs import _HeadLogps

    g = torch.Generator().manual_seed(4)
    h = torch.randn(300, 48, generator=g)
    w = torch.randn(600, 48, generator=g)
    targets = torch.randint(0, 600, (300,), generator=g)
    gout = torch.randn(300, generator=g)
    res = []
    for env in ("onednn", "aten"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(gemm.ENV, env)
            hi, wi = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            lp = _HeadLogps.apply(hi, wi, None, targets, None, 1.0, 128, torch.float32)
            lp.backward(gout)
            res.append((lp.detach(), hi.grad, wi.grad))
    assert onednn[0] > 0
    (a, ha, wa), (b, hb, wb) = res
    tol = 64 * 48 * EPS[torch.float32]
    for x, y in ((a, b), (ha, hb), (wa, wb)):
        assert float((x - y).abs().max()) <= tol * float(y.abs().max())


def test_onednn_logits_take_their_gradient_in_place(onednn: list[int]) -> None:
    """Logits from :func:`exoalign.gemm.linear` (its backward keeps no output) are reused for their gradient in the
    training loop's block, and the gradients equal those through ``F.linear`` with a buffer of their own."""
    from exoalign.logprobs import _reusable, logits_grad_in_place, token_logps

    g = torch.Generator().manual_seed(5)
    h0 = torch.randn(40, 16, generator=g)
    w0 = torch.randn(2000, 16, generator=g)
    tgt = torch.randint(0, 2000, (40,), generator=g)
    res = []
    for fast in (True, False):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        with logits_grad_in_place():
            logits = gemm.linear(h, w) if fast else F.linear(h, w)
            assert _reusable(logits)
            out = token_logps(logits, tgt)
        res.append((out.detach(), *torch.autograd.grad(out.sum(), [h, w]), logits._version))
    assert onednn[0] == 2
    (o1, h1, w1, v1), (o0, h0g, w0g, v0) = res
    assert v1 > 0 and v0 > 0  # both gradients went into the logits' storage
    tol = 64 * 2000 * EPS[torch.float32]  # a softmax over 2 000 logits after 16-wide products
    for a, b in ((o1, o0), (h1, h0g), (w1, w0g)):
        assert float((a - b).abs().max()) <= tol * float(b.abs().max())


def test_gemm_backends_benchmark_writes_its_json(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks/gemm_backends.py --no-step``: every product timed both ways, the CPU and the choice recorded."""
    import json
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    sys.modules.pop("gemm_backends", None)
    import gemm_backends

    out = tmp_path / "g.json"
    threads = torch.get_num_threads()
    assert gemm_backends.main(["--json", str(out), "--reps", "1", "--no-step", "--threads", "2"]) == 0
    assert torch.get_num_threads() == threads  # the test process's setting is back (other tests depend on it)
    res = json.loads(out.read_text())
    assert {"cpu", "versions", "auto_picks_onednn", "load_start", "load_end", "products"} <= set(res)
    assert "step" not in res and len(res["products"]) == 14
    for row in res["products"]:
        assert row["aten_gflops"] > 0 and row["onednn_gflops"] > 0
        assert row["ratio"] == pytest.approx(row["onednn_gflops"] / row["aten_gflops"])


def test_cli_stops_on_a_bad_backend_name(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A command that loads models refuses a bad ``EXOALIGN_FP32_MATMUL`` at once: one line, exit code 2."""
    from exoalign.cli import main

    monkeypatch.setenv(gemm.ENV, "blas")
    assert main(["train", "--help"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and gemm.ENV in err and "Fix:" in err
