"""The fast sampler (shared prefill, scored draw, bf16 copy): same tokens as the pre-change path in fp32, and the
per-token log-probs it reports equal a forward pass of the sampling model on the sampled ids."""

from __future__ import annotations

import pytest
import torch
from numerics import EPS, assert_close_scaled
from refs import alive_without_collector

from exoalign.models import build_model, tiny_config
from exoalign.sampling import (
    HFSampler,
    SamplingSettings,
    ScoredDraw,
    SeededSampler,
    _bf16_packing,
    _shared_prefix_layout,
    completion_seed,
    pack_linears,
    sampling_copy,
)

PROMPTS = ["the movie was", "a delightful story with a", "i", "what a fantastic surprise , truly a good"]  # "i": one token
# Prompts that start alike (as a chat template's system prompt): the prefill computes the shared columns once.
SYSTEM = "you are a kind critic . review the film : "
SHARED = [SYSTEM + p for p in PROMPTS]


def _model(tokenizer, model_type: str) -> torch.nn.Module:
    kw = {} if model_type == "gpt2" else dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=256)
    return build_model(tiny_config(len(tokenizer), model_type=model_type, **kw), seed=0, tokenizer=tokenizer).eval()


def _sample(model, tok, k: int = 3, prompts=PROMPTS, **kw) -> list:
    s = SamplingSettings(temperature=kw.pop("temperature", 0.9), max_new_tokens=kw.pop("max_new_tokens", 12),
                         seed=3, **kw)
    ids = [tok(p)["input_ids"] for p in prompts]
    return HFSampler(model, tok, s, stream="t").generate(ids, list(range(len(ids))), k)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("opts", [{}, {"min_new_tokens": 2}, {"top_k": 20, "top_p": 0.9}, {"prompts": SHARED},
                                  {"prompts": SHARED[:1] * 2, "min_new_tokens": 1}])
def test_fast_path_gives_the_pre_change_tokens_in_fp32(tiny_tokenizer, model_type, opts):
    """fp32, fixed seed: shared prefill + scored draw (+ prompts' shared start computed once) emit exactly the
    tokens of the pre-change path (generate on every row, left padded)."""
    model = _model(tiny_tokenizer, model_type)
    fast = _sample(model, tiny_tokenizer, **opts)
    old = _sample(model, tiny_tokenizer, shared_prefill=False, **opts)
    assert [[c.ids for c in g] for g in fast] == [[c.ids for c in g] for g in old]
    assert [[c.finished for c in g] for g in fast] == [[c.finished for c in g] for g in old]
    assert all(c.logps is not None and len(c.logps) == len(c.ids) for g in fast for c in g)


@pytest.mark.parametrize("spread", [0.1, 1.0, 5.0, 30.0])
def test_pruned_gumbel_draw_equals_the_full_one(spread):
    """ScoredDraw computes the Gumbel noise only where a token can still win; the drawn tokens equal the full
    draw's for flat and peaked logits alike, with filtered (-inf) tokens, over many rows and steps."""
    R, V = 64, 5000
    seeds = [completion_seed(7, i, 0) for i in range(R)]
    full, pruned = SeededSampler(seeds, torch.device("cpu")), ScoredDraw(seeds, torch.device("cpu"), warpers=[],
                                                                         min_new_tokens=0, eos_id=None)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # consecutive steps: both consume their streams alike
        logits = spread * torch.randn(R, V, generator=g)
        logits[:, :: 7] = float("-inf")
        assert torch.equal(full.draw(logits), pruned.draw(logits))


def _forward_logps(model, prompt: list[int], ids: list[int], temperature: float) -> torch.Tensor:
    """``log softmax(logits / T)`` of each sampled id, from one forward pass over prompt + completion."""
    x = torch.tensor([prompt + ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, len(prompt) - 1 : -1].float() / temperature  # (n, V)
    return logits.log_softmax(-1).gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1)  # (n,)


@pytest.mark.parametrize("prompts", [PROMPTS, SHARED], ids=["distinct", "shared-start"])
@pytest.mark.parametrize("dtype", ["model", "bfloat16"])
def test_reported_logps_equal_a_forward_pass(tiny_tokenizer, dtype, prompts):
    """Each token's reported log-prob equals ``log softmax(logits/T)`` of the sampling model (the fp32 model, or its
    bf16 copy, whose decode attention is ours) in one unpadded forward pass over prompt + sampled ids, the basis
    of online EXO's ``log μ``."""
    model = _model(tiny_tokenizer, "llama")
    T = 0.8
    s = SamplingSettings(temperature=T, max_new_tokens=12, seed=1, sample_dtype=dtype)
    sampler = HFSampler(model, tiny_tokenizer, s)
    ids = [tiny_tokenizer(p)["input_ids"] for p in prompts]
    groups = sampler.generate(ids, list(range(len(ids))), 3)
    ref = sampler.sampling_model
    assert (ref is model) == (dtype == "model")
    assert next(model.parameters()).dtype == torch.float32  # the caller's weights are untouched
    wdtype = next(ref.parameters()).dtype
    for p, g in zip(ids, groups):
        for c in g:
            want = _forward_logps(ref, p, c.ids, T)
            # Padded batch + KV cache vs one unpadded pass: the same sums in another order. A logit is a
            # reduction over the width (64) of values rounded to the weights' dtype, through 2 layers; a log-prob
            # is O(log V) = O(6) in size, so 64·eps·√64 of that scale covers the rounding in fp32 and in bf16.
            assert_close_scaled(torch.tensor(c.logps), want, 64 * EPS[wdtype] * 8, scale=max(6.0, float(want.abs().max())))


def test_shared_prefix_layout(tiny_tokenizer):
    """The shared start sits in the first columns, each prompt's rest flush right; every real token keeps its
    left-padded position (positions come from the mask); a prompt's last token is never shared."""
    prompts = [tiny_tokenizer(p)["input_ids"] for p in SHARED]
    ids, mask, c = _shared_prefix_layout(prompts, pad_id=0)
    n_sys = len(tiny_tokenizer(SYSTEM.strip())["input_ids"])
    assert c >= min(4, n_sys - 1) and all(p[:c] == prompts[0][:c] for p in prompts)
    assert c < min(map(len, prompts))
    for r, p in enumerate(prompts):
        assert ids[r][mask[r].bool()].tolist() == p  # the prompt, in order, where the mask is 1
        assert int(mask[r, -1]) == 1  # the last column is the prompt's last token
    same = [[5, 6, 7], [5, 6, 7]]  # identical prompts: everything but the last token is shared
    assert _shared_prefix_layout(same, 0, min_shared=1)[2] == 2
    assert _shared_prefix_layout([[5, 6, 7], [8, 6, 7]], 0)[2] == 0  # nothing shared: plain left padding
    ids, mask, c = _shared_prefix_layout([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9]], 0)
    assert c == 4 and ids.tolist() == [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 0, 9]]
    assert mask.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 1]]


def test_bf16_copy_samples_and_resume_record(tiny_tokenizer):
    """``sample_dtype`` appears in the resume record only when set (older records stay valid)."""
    assert "sample_dtype" not in SamplingSettings().sampling_dict()
    assert SamplingSettings(sample_dtype="bfloat16").sampling_dict()["sample_dtype"] == "bfloat16"
    model = _model(tiny_tokenizer, "gpt2")
    groups = _sample(model, tiny_tokenizer, sample_dtype="bfloat16")
    assert all(len(c.ids) >= 1 for g in groups for c in g)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["model", "bfloat16"])
def test_fast_path_on_cuda(tiny_tokenizer, dtype):
    """On a GPU: fp32 fast path = pre-change tokens; reported log-probs = a forward pass (fp32 and the bf16 copy)."""
    model = _model(tiny_tokenizer, "llama").cuda()
    if dtype == "model":
        fast = _sample(model, tiny_tokenizer)
        old = _sample(model, tiny_tokenizer, shared_prefill=False)
        assert [[c.ids for c in g] for g in fast] == [[c.ids for c in g] for g in old]
    T = 0.9
    sampler = HFSampler(model, tiny_tokenizer, SamplingSettings(temperature=T, max_new_tokens=12, seed=2,
                                                               sample_dtype=dtype))
    ids = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    groups = sampler.generate(ids, list(range(len(ids))), 3)
    ref = sampler.sampling_model
    wdtype = next(ref.parameters()).dtype
    for p, g in zip(ids, groups):
        for c in g:
            x = torch.tensor([p + c.ids], device="cuda")
            with torch.no_grad():
                logits = ref(input_ids=x).logits[0, len(p) - 1 : -1].float() / T
            want = logits.log_softmax(-1).gather(1, torch.tensor(c.ids, device="cuda")[:, None]).squeeze(1).cpu()
            # as on the CPU (see test_reported_logps_equal_a_forward_pass); GPU kernels may use TF32-free fp32
            assert_close_scaled(torch.tensor(c.logps), want, 64 * EPS[wdtype] * 8, scale=max(6.0, float(want.abs().max())))


def test_packed_linears_keep_outputs_and_weights(tiny_tokenizer):
    """The bf16 sampling copy's linear layers read weights packed in oneDNN's layout (where oneDNN has bf16): the
    logits equal those of the same copy unpacked (to bf16 rounding), the state dict and the tied head are the
    same tensors, and a forward that needs gradients takes the plain path."""
    import copy

    model = _model(tiny_tokenizer, "llama")
    twin = sampling_copy(model, "bfloat16")
    plain = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)
    n_linear = sum(type(m) is torch.nn.Linear for m in plain.modules())
    assert pack_linears(copy.deepcopy(plain)) == (n_linear if _bf16_packing() else 0)
    assert twin.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(twin.state_dict()[k], v) for k, v in plain.state_dict().items())
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        assert twin.get_output_embeddings().weight is twin.get_input_embeddings().weight
    ids = torch.tensor([tiny_tokenizer(p)["input_ids"] for p in SHARED[:1]] * 3)
    with torch.no_grad():
        got, want = (m(input_ids=ids).logits.float() for m in (twin, plain))
    # A logit is a reduction over the width (64) through 2 layers of bf16 products: 16·eps·√64 of its scale.
    assert_close_scaled(got, want, 16 * EPS[torch.bfloat16] * 8, scale=float(want.abs().max()))
    head = twin.get_output_embeddings()
    x = torch.randn(2, head.in_features, dtype=torch.bfloat16, requires_grad=True)
    head(x).float().sum().backward()  # the packed path has no backward: this must take F.linear
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _cast_like_loading(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``deepcopy(model).to(dtype)`` with the buffers a model computes itself (non-persistent: rotary frequencies)
    left in their dtype, as ``from_pretrained`` builds a model in ``dtype``."""
    import copy

    twin = copy.deepcopy(model).to(dtype)
    for src, dst in zip(model.modules(), twin.modules()):
        for name in src._non_persistent_buffers_set:
            if src._buffers.get(name) is not None:
                dst._buffers[name] = src._buffers[name].clone()
    return twin


def test_a_dropped_sampling_copy_is_freed_at_once(tiny_tokenizer):
    """Every layer of a dropped bf16 sampling copy (packed weights included) is freed by reference counting alone:
    an online run makes a copy per round, and copies kept until Python's next full collection grew its memory by
    a copy per round. A deep copy of a packed model reads its own weights."""
    import copy

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def reset() -> None:  # accelerate's state is per process; other tests' accelerators have other settings
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()

    model = _model(tiny_tokenizer, "llama")
    # as an online run's policy: prepared for bf16 mixed precision, which stores autocast wrappers on it
    reset()
    try:
        model = Accelerator(cpu=True, mixed_precision="bf16").prepare(model)
    finally:
        reset()
    assert "forward" in model.__dict__
    twin = sampling_copy(model, "bfloat16")
    assert "forward" not in twin.__dict__ and "_original_forward" not in twin.__dict__
    ids = torch.tensor([tiny_tokenizer(SHARED[0])["input_ids"]])
    with torch.no_grad():  # the same logits as the copy with the trainer's wrappers (the sampler reads them in fp32)
        wrapped = _cast_like_loading(model, torch.bfloat16).eval()
        assert torch.equal(twin(input_ids=ids).logits.float(), wrapped(input_ids=ids).logits.float())
    del wrapped
    packed = [m for m in twin.modules() if "forward" in m.__dict__]
    assert len(packed) == (sum(type(m) is torch.nn.Linear for m in twin.modules()) if _bf16_packing() else 0)
    if packed:
        again = copy.deepcopy(twin)  # packs its own weights again on first use
        layer = again.get_output_embeddings()
        assert layer.forward.module is layer and layer.forward.module is not twin.get_output_embeddings()
        with torch.no_grad():
            assert torch.equal(again(input_ids=ids).logits, twin(input_ids=ids).logits)
        del again, layer
    del packed
    holder = [twin]
    del twin
    alive, n = alive_without_collector(holder, lambda m: list(m.modules()))
    assert alive == 0, f"{alive} of {n} modules of the dropped copy are still alive"


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_sampling_copy_is_the_cast_model_and_leaves_the_source_alone(tiny_tokenizer, model_type, tmp_path):
    """The bf16 sampling copy, cast while copying: the state of ``deepcopy(model).to(bf16)`` (persistent buffers
    included), the buffers the model computes itself (rotary frequencies) in their own dtype, as in the model
    ``from_pretrained`` loads in bf16; tied weights still tied, no gradients; the source keeps its fp32 weights,
    their gradients and flags."""
    import copy

    from exoalign.models import load_causal_lm
    from exoalign.sampling import sampling_copy

    model = _model(tiny_tokenizer, model_type).train()
    model.get_input_embeddings().weight.grad = torch.ones_like(model.get_input_embeddings().weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = copy.deepcopy(model).to(torch.bfloat16).state_dict()
    twin = sampling_copy(model, "bfloat16")
    got = twin.state_dict()
    assert got.keys() == expected.keys()
    for k in got:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k
    assert not twin.training and not any(p.requires_grad for p in twin.parameters())
    assert all(p.grad is None for p in twin.parameters())
    model.save_pretrained(tmp_path / "m")
    loaded = load_causal_lm(str(tmp_path / "m"), dtype="bfloat16")  # what eval loads a checkpoint as
    own = {n: b for n, b in twin.named_buffers() if b.is_floating_point()}
    assert own.keys() == {n for n, b in loaded.named_buffers() if b.is_floating_point()}
    for n, b in loaded.named_buffers():
        if b.is_floating_point():
            assert own[n].dtype == b.dtype and torch.equal(own[n], b), n
    if model_type == "llama":
        assert twin.model.rotary_emb.inv_freq.dtype == torch.float32
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        assert twin.get_output_embeddings().weight is twin.get_input_embeddings().weight
    assert model.training and all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert model.get_input_embeddings().weight.grad is not None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sampling_copy(model, "float32") is model and sampling_copy(model, "model") is model


@pytest.mark.parametrize("inference", [False, True])
def test_uniforms_split_between_threads_are_each_streams_own(monkeypatch, inference):
    """The draw's uniforms filled by several threads (rows split between them) are, row by row, the numbers of
    that row's own stream: torch.rand(V, generator=g) called in order; under inference mode too."""
    import exoalign.sampling as sampling

    monkeypatch.setattr(sampling, "_PARALLEL_UNIFORMS", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        seeds = [completion_seed(0, i, j) for i in range(7) for j in range(2)]
        draw = ScoredDraw(seeds, torch.device("cpu"), warpers=[], min_new_tokens=0, eos_id=None)
        scores = torch.zeros(len(seeds), 1000)
        with torch.inference_mode(inference):
            first = draw.uniforms(scores).clone()
            second = draw.uniforms(scores).clone()
    finally:
        torch.set_num_threads(threads)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    expected_first = torch.stack([torch.rand(1000, generator=g) for g in gens])
    expected_second = torch.stack([torch.rand(1000, generator=g) for g in gens])
    assert torch.equal(first, expected_first) and torch.equal(second, expected_second)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_bf16_decode_runs_its_products_on_every_thread_and_the_rest_on_one(tiny_tokenizer, model_type, monkeypatch):
    """The bf16 copy's decode steps on 2 threads (:class:`ProductThreads`): the packed products run on both, the
    model's other modules on one, the draw on both; the caller's count is back after every step, and after an
    error. Samples and log-probs equal those of the decode without the split. Where this CPU cannot pack bf16
    weights nothing is split."""
    import exoalign.sampling as sampling

    packs = _bf16_packing()
    seen: dict[str, set[int]] = {"product": set(), "module": set(), "draw": set()}
    product, draw = sampling._PackedForward._product, ScoredDraw.draw

    def recorded_product(*a):
        seen["product"].add(torch.get_num_threads())
        return product(*a)

    def recorded_draw(self, scores):
        seen["draw"].add(torch.get_num_threads())
        return draw(self, scores)

    def copy_with_hooks(model, dtype):
        twin = sampling_copy(model, dtype)
        for m in twin.modules():
            if not list(m.children()) and type(m) is not torch.nn.Linear:
                m.register_forward_pre_hook(lambda *_: seen["module"].add(torch.get_num_threads()))
        return twin

    monkeypatch.setattr(sampling._PackedForward, "_product", staticmethod(recorded_product))
    monkeypatch.setattr(ScoredDraw, "draw", recorded_draw)
    monkeypatch.setattr(sampling, "sampling_copy", copy_with_hooks)
    model = _model(tiny_tokenizer, model_type)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        split = _sample(model, tiny_tokenizer, prompts=SHARED, sample_dtype="bfloat16")
        after = torch.get_num_threads()
        modules_split = set(seen["module"])
        with monkeypatch.context() as m:
            m.setattr(sampling.ProductThreads, "__enter__", lambda self: self)
            whole = _sample(model, tiny_tokenizer, prompts=SHARED, sample_dtype="bfloat16")
        twin = sampling.sampling_copy(model, "bfloat16")
        with pytest.raises(RuntimeError, match="inside"), sampling.ProductThreads(twin):
            inside = torch.get_num_threads()
            raise RuntimeError("inside")
        after_error = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert after == after_error == 2 and sampling._SPLIT.products == 0
    assert [[(c.ids, c.logps) for c in g] for g in split] == [[(c.ids, c.logps) for c in g] for g in whole]
    assert seen["draw"] == {2}
    if packs:
        assert seen["product"] == {2} and inside == 1
        assert 1 in modules_split  # the decode steps' modules (the prefill's keep both threads)
        assert seen["module"] == {1, 2}
    else:
        assert not seen["product"] and inside == 2 and modules_split == {2}


def _decode_fed(model, tokenizer, room: int | None, static: bool, replace_at: int = -1) -> list[torch.Tensor]:
    """The sampler's decode written out on ragged left-padded prompts with a shared start (k = 2), the same random
    tokens fed at each of 6 steps: each step's last-position logits, on the prefill's dynamic cache (``room`` None)
    or on ``_with_room(cache, room, static)``, whose layers must be the expected kind and must have taken the
    prefill's tensors. ``replace_at``: the step before which every layer's tensors are replaced by copies (as a
    crop or a batch selection would)."""
    import exoalign.sampling as sampling

    ids = [tokenizer(p)["input_ids"] for p in SHARED + PROMPTS[:2]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    x, mask, shared = _shared_prefix_layout(ids, pad)
    k, steps = 2, 6
    fed = torch.randint(5, len(tokenizer), (len(ids) * k, steps), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache = HFSampler._prefill(model, x, mask, k, shared)
        if room is not None:
            source, cache = cache, sampling._with_room(cache, room, static=static)
            kind = "StaticLayer" if static else "RoomyDynamicLayer"
            assert all(type(layer).__name__ == kind for layer in cache.layers)
            assert all(layer.keys is None for layer in source.layers)  # moved, not held twice
        rows_mask = mask.repeat_interleave(k, 0)
        pos = (rows_mask.cumsum(-1) - 1)[:, -1:]
        cur, attn, out = x.repeat_interleave(k, 0)[:, -1:], rows_mask, []
        for t in range(steps):  # the same tokens fed to every cache
            if t == replace_at:
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
            out.append(model(input_ids=cur, attention_mask=attn, position_ids=pos, cache=cache,
                             use_cache=True).logits[:, -1].float())
            cur, pos = fed[:, t : t + 1], pos + 1
            attn = torch.cat([attn, attn.new_ones((len(attn), 1))], -1)
        if room is not None and not static:
            n = x.shape[1] - 1 + steps
            assert all(layer.keys.shape[-2] == n == layer.get_seq_length() for layer in cache.layers)
    return out


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_bf16_decode_writes_into_a_cache_with_room(tiny_tokenizer, model_type, monkeypatch):
    """The bf16 copy decodes on a cache with room for every new token (transformers' static layers, filled from the
    prefill): the logits of each step equal those on the growing dynamic cache to bf16 rounding, over ragged
    left-padded prompts and a shared start. The sampler picks static layers for the bf16 copy and dynamic layers
    with room for the caller's fp32 model (the test below)."""
    import exoalign.sampling as sampling

    model = _model(tiny_tokenizer, model_type)
    twin = sampling_copy(model, "bfloat16")
    for got, want in zip(_decode_fed(twin, tiny_tokenizer, 6, static=True),
                         _decode_fed(twin, tiny_tokenizer, None, static=True)):
        # A logit: a reduction over the width (64) through 2 bf16 layers; the attention's sums differ in order only.
        assert_close_scaled(got, want, 16 * EPS[torch.bfloat16] * 8, scale=float(want.abs().max()))

    calls = []
    real = sampling._with_room
    monkeypatch.setattr(sampling, "_with_room",
                        lambda cache, extra, static: calls.append((extra, static)) or real(cache, extra, static))
    _sample(model, tiny_tokenizer, sample_dtype="bfloat16", max_new_tokens=5)
    assert calls == [(5, True)]  # the bf16 copy decodes on static layers with room for its 5 new tokens
    calls.clear()
    _sample(model, tiny_tokenizer, max_new_tokens=5)
    assert calls == [(5, False)]  # fp32: the caller's model, SDPA and a dynamic cache with room


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_fp32_decode_writes_into_a_dynamic_cache_with_room(tiny_tokenizer, model_type):
    """The caller's fp32 model decodes on dynamic layers that write each new column into a buffer with room
    (``_with_room(static=False)``, which moves the prefill's tensors instead of holding them twice) instead of
    concatenating the whole cache: every step's logits are bit for bit the growing cache's (attention reads views
    of the same values), over ragged left-padded prompts and a shared start; a layer out of room, or whose tensors
    other code replaced, moves into a new buffer and keeps the same numbers; a reset layer starts a new one. Which
    cache the sampler picks: the test above."""
    import exoalign.sampling as sampling

    model = _model(tiny_tokenizer, model_type)
    want = _decode_fed(model, tiny_tokenizer, None, static=False)
    for room, replace_at in [(6, -1), (2, -1), (6, 3)]:
        for got, ref in zip(_decode_fed(model, tiny_tokenizer, room, static=False, replace_at=replace_at), want):
            assert torch.equal(got, ref)

    layer = sampling._roomy_layer_class()(torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 3), 1)
    layer.reset()  # as Cache.reset() leaves it: the next update starts a new buffer
    keys, _ = layer.update(torch.ones(1, 1, 2, 3), torch.ones(1, 1, 2, 3))
    keys, _ = layer.update(torch.full((1, 1, 1, 3), 2.0), torch.full((1, 1, 1, 3), 2.0))
    assert keys.tolist() == [[[[1.0] * 3, [1.0] * 3, [2.0] * 3]]] and layer.get_seq_length() == 3


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", ["model", "bfloat16"])
def test_kept_prompt_caches_give_the_samplers_own_numbers(tiny_tokenizer, model_type, dtype):
    """A sampler that takes its prefill from eval's kept prompt caches (π_sft's) draws the tokens and reports the
    log-probs it draws and reports when it prefills itself, bit for bit, for k = 1 and k = 3, a second time from the
    same kept caches, and with prompts that share a start; caches of another model are not used."""
    from exoalign.eval.reference import PrefixCachedLogps

    model = _model(tiny_tokenizer, model_type)
    copy = sampling_copy(model, dtype)
    s = SamplingSettings(temperature=0.9, max_new_tokens=8, seed=3, sample_dtype=dtype)
    for prompts in (PROMPTS, SHARED):
        ids = [tiny_tokenizer(p)["input_ids"] for p in prompts]
        kept = PrefixCachedLogps(copy, tiny_tokenizer.pad_token_id, 0.9)
        for k in (1, 3):
            own = HFSampler(model, tiny_tokenizer, s, stream="t").generate(ids, list(range(len(ids))), k)
            for _ in range(2):
                sampler = HFSampler(copy, tiny_tokenizer, s, stream="t", prompt_caches=kept)
                shared = sampler.generate(ids, list(range(len(ids))), k)
                assert [[(c.ids, c.logps) for c in g] for g in shared] == [[(c.ids, c.logps) for c in g] for g in own]
        assert (kept.misses, kept.hits) == (1, 3)  # computed once, then taken from the kept caches
        other = PrefixCachedLogps(_model(tiny_tokenizer, model_type), tiny_tokenizer.pad_token_id, 0.9)
        HFSampler(copy, tiny_tokenizer, s, stream="t", prompt_caches=other).generate(ids, [0, 1, 2, 3], 1)
        assert other.misses == other.hits == 0  # not the model sampled from: the sampler prefills itself
