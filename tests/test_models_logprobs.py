import torch
from numerics import assert_close_scaled, rel_tol

from exoalign.logprobs import sequence_logps, token_logps
from exoalign.models import load_causal_lm, load_tokenizer


def test_token_logps_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(37, 50) * 5
    tgt = torch.randint(0, 50, (37,))
    ref = logits.log_softmax(-1).gather(-1, tgt[:, None]).squeeze(-1)
    tol = rel_tol(torch.float32, 50)  # fp32 log-sum-exp over 50 logits, another summation order
    assert_close_scaled(token_logps(logits, tgt, chunk=8), ref, tol, what="chunked")
    ref_t = (logits / 0.8).log_softmax(-1).gather(-1, tgt[:, None]).squeeze(-1)
    assert_close_scaled(token_logps(logits, tgt, temperature=0.8), ref_t, tol, what="temperature 0.8")


def test_sequence_logps_left_padding_equals_unpadded(tiny_model, tiny_tokenizer):
    """A left-padded prompt + right-padded completion gives the same log-prob as the row on its own."""
    tiny_model.eval()
    prompt = tiny_tokenizer("the movie was")["input_ids"]
    comp = tiny_tokenizer(" great fun")["input_ids"] + [tiny_tokenizer.eos_token_id]
    pad = tiny_tokenizer.pad_token_id
    alone = torch.tensor([prompt + comp])
    labels_alone = torch.tensor([[-100] * len(prompt) + comp])
    lp1, n1 = sequence_logps(tiny_model, alone, torch.ones_like(alone), labels_alone)
    ids = torch.tensor([[pad, pad] + prompt + comp + [pad]])
    mask = torch.tensor([[0, 0] + [1] * (len(prompt) + len(comp)) + [0]])
    labels = torch.tensor([[-100, -100] + [-100] * len(prompt) + comp + [-100]])
    lp2, n2 = sequence_logps(tiny_model, ids, mask, labels)
    with torch.no_grad():
        full = tiny_model(alone).logits[0, :-1].log_softmax(-1)
        naive = full[len(prompt) - 1 :].gather(-1, torch.tensor(comp)[:, None]).sum()
    assert int(n1) == int(n2) == len(comp)
    # fp32 forward of other shapes (padding): rounding over the vocabulary's reduction, per token, summed
    tol = rel_tol(torch.float32, tiny_model.config.vocab_size)
    assert_close_scaled(lp1, naive.reshape(1), tol, what="vs log_softmax")
    assert_close_scaled(lp1, lp2, tol, what="padded vs alone")


def test_load_local_dir(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    assert tok.pad_token is not None
    assert model.config.vocab_size == len(tok)


def test_trainable_weights_get_memory_of_their_own(tiny_model_dir):
    """Weights loaded from safetensors map the file (copy-on-write); the trainable ones get a private copy before
    the optimizer writes them, the frozen ones stay mapped, and no value or tie changes."""
    from exoalign.models import file_backed, own_trainable_weights

    model = load_causal_lm(str(tiny_model_dir))
    assert all(file_backed(p) for p in model.parameters())  # the premise: fp32 safetensors loaded as a mapping
    model.transformer.ln_f.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert own_trainable_weights(model) == len(trainable)
    assert not any(file_backed(p) for p in model.parameters() if p.requires_grad)
    assert file_backed(model.transformer.ln_f.weight)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert own_trainable_weights(model) == 0  # nothing left to copy
