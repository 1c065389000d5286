"""One prompt encoder for training, sampling and eval (issue 21 item 4): no double BOS when the tokeniser adds
BOS and the chat template writes it too (Llama-3, Gemma)."""

from __future__ import annotations

import pytest

import exoalign.eval.evaluate
import exoalign.sampling
import exoalign.stages.sample
from exoalign.data import encode_prompts, load_rows, tokenize_rows

BOS = "<s>"


@pytest.fixture(scope="module")
def bos_tokenizer(corpus):
    """A BPE tokeniser whose post-processor adds BOS (as Llama's does) and whose chat template writes BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=[BOS, "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return fast


def test_the_tokeniser_really_adds_bos_and_the_template_really_writes_it(bos_tokenizer):
    """The premise: encoding the rendered text with special tokens gives the double BOS the encoder avoids."""
    bos = bos_tokenizer.bos_token_id
    assert bos_tokenizer("the movie")["input_ids"][0] == bos
    text = bos_tokenizer.apply_chat_template([{"role": "user", "content": "the movie"}], tokenize=False,
                                             add_generation_prompt=True)
    assert text.startswith(BOS) and bos_tokenizer(text)["input_ids"][:2] == [bos, bos]


def test_one_bos_in_training_sampling_and_eval(bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    rows = load_rows([{"prompt": [{"role": "user", "content": "the movie was"}], "chosen": "great", "rejected": "bad"},
                      {"prompt": "the film was", "chosen": "fun", "rejected": "dull"}], "pair", tokenizer=bos_tokenizer)
    prompts = [r["prompt"] for r in rows]
    assert prompts[0].startswith(BOS) and not prompts[1].startswith(BOS)
    train_ids = [f["prompt_ids"] for f in tokenize_rows(rows, bos_tokenizer, max_length=64, max_prompt_length=32)]
    for ids in train_ids:  # a chat prompt keeps the template's BOS, a plain one gets the tokeniser's: one each
        assert ids[0] == bos and ids.count(bos) == 1, ids
    assert encode_prompts(bos_tokenizer, prompts, 32) == train_ids
    # sample and eval encode with this very function; the old always-add-special-tokens encoder is gone.
    assert exoalign.stages.sample.encode_prompts is encode_prompts
    assert exoalign.eval.evaluate.encode_prompts is encode_prompts
    assert not hasattr(exoalign.sampling, "encode_prompts")
    assert encode_prompts(bos_tokenizer, prompts, 3) == [ids[-3:] for ids in train_ids]  # cut from the left
