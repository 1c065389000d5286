"""Shared fixtures: a tokeniser trained on the spot and tiny GPT-2 models built from a config (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# inductor's on-disk graph cache does not key its kernels by the vector ISA that ATEN_CPU_CAPABILITY picks: a
# kernel compiled on this CPU's own path and read back under another fails to run (`make test-kernels`). Each
# forced path compiles into a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{os.getuid()}_{os.environ['ATEN_CPU_CAPABILITY']}")
# Tiny models run fastest on one thread; two threads spin-wait when the 2 CPUs are shared with other work.
torch.set_num_threads(1)

CORPUS = [
    "the movie was great and the acting was wonderful",
    "the film was terrible and the plot was boring",
    "a delightful story with a charming cast",
    "an awful mess with a dull script and bad jokes",
    "i loved the music and the pictures were beautiful",
    "i hated the ending and the dialogue was weak",
    "what a fantastic surprise, truly a good time",
    "what a waste of time, truly a bad film",
] * 8


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return list(CORPUS)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from exoalign.models import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS, vocab_size=300, model_max_length=256)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from exoalign.models import build_model, tiny_config

    return build_model(tiny_config(len(tiny_tokenizer)), seed=0, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny GPT-2 + tokeniser directory, loadable with ``from_pretrained`` (stands in for a hub model)."""
    from exoalign.models import build_model, tiny_config

    path = tmp_path_factory.mktemp("tiny-gpt2")
    model = build_model(tiny_config(len(tiny_tokenizer)), seed=0, tokenizer=tiny_tokenizer)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="session")
def chat_tokenizer():
    """The tiny tokeniser with a small chat template (``<|user|>text\\n<|assistant|>``)."""
    from exoalign.models import train_bpe_tokenizer

    tok = train_bpe_tokenizer(CORPUS, vocab_size=300, model_max_length=256)
    tok.chat_template = CHAT_TEMPLATE
    return tok
