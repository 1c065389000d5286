"""The demo's settings: everything its numbers depend on, and which stage reads which."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = (("exo", "rw"), ("dpo", "rw"), ("exo", "pref"), ("dpo", "pref"))
"""The four runs: (loss, target), named ``{loss}-{target}`` in results.json. The rw runs (K completions per
prompt, about twice the work of a pair) come first so that two workers finish together."""


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo's numbers depend on (recorded in results.json and report.md)."""

    seed: int = 0
    """Seed of the corpus, π_sft's initialisation, sampling and training."""
    n_sft_reviews: int = 6000
    """Reviews π_sft is trained on."""
    n_train_prompts: int = 1024
    """Prompts for which π_sft's completions are sampled, scored and used to align (other reviews)."""
    n_eval_prompts: int = 128
    """Held-out prompts every checkpoint is evaluated on."""
    vocab_size: int = 1024
    """Byte-level BPE vocabulary trained on the SFT rows."""
    n_layer: int = 4
    """π_sft transformer blocks."""
    n_embd: int = 128
    """π_sft width."""
    n_head: int = 4
    """π_sft attention heads."""
    max_length: int = 96
    """Tokens of prompt + completion in training (reviews are ~45 tokens, rarely over 90)."""
    sft_steps: int = 400
    """SFT optimizer steps."""
    sft_batch_size: int = 32
    """SFT rows per step."""
    sft_lr: float = 3e-3
    """SFT peak learning rate (cosine decay, warm-up 5%)."""
    k: int = 4
    """Completions sampled per training prompt; rw runs use all K, pref runs the best-vs-worst pair."""
    temperature: float = 1.0
    """Sampling temperature of the training completions and of evaluation (KL measured at it)."""
    max_new_tokens: int = 48
    """Longest completion, in tokens."""
    align_steps: int = 200
    """Optimizer steps of each of the four alignment runs."""
    align_batch_size: int = 16
    """Prompts per alignment step (pref: 16 pairs; rw: 16 groups of K)."""
    align_lr: float = 5e-5
    """Alignment learning rate (constant after a 10-step warm-up)."""
    save_every: int = 25
    """Checkpoint (and evaluate) every this many alignment steps."""
    beta_pi: float = 0.1
    """β_π of every loss (the DPO β)."""
    beta_r: float = 0.1
    """β_r of the rw targets softmax(r/β_r); rewards lie in [-1, 1]."""
    eps: float = 1e-3
    """Label smoothing ε of the pref targets [1-ε, ε]."""
    eval_samples: int = 2
    """Completions per held-out prompt and checkpoint."""
    gen_batch_size: int = 64
    """Prompts per generation batch."""

    def __post_init__(self) -> None:
        from ..config import require

        for name in ("n_sft_reviews", "n_train_prompts", "n_eval_prompts", "n_layer", "n_embd", "n_head",
                     "sft_steps", "sft_batch_size", "max_new_tokens", "align_steps", "align_batch_size",
                     "save_every", "eval_samples", "gen_batch_size"):
            require(getattr(self, name) >= 1, name, "must be at least 1", "use a positive whole number")
        require(self.n_eval_prompts >= 2, "n_eval_prompts", "must be at least 2", "use e.g. 128")
        require(self.k >= 2, "k", f"K must be at least 2 (got {self.k})", "use k=2 or more")
        require(self.save_every <= self.align_steps, "save_every", "must not exceed align_steps",
                "checkpoint at least once, e.g. save_every=align_steps")
        require(self.n_embd % self.n_head == 0, "n_head", "must divide n_embd", "e.g. n_embd=128 with n_head=4")


QUICK = dict(
    n_sft_reviews=2000, n_train_prompts=96, n_eval_prompts=48, vocab_size=768, n_layer=2, n_embd=64, n_head=2,
    sft_steps=150, sft_lr=5e-3, k=4, max_new_tokens=32, align_steps=24, align_batch_size=8, align_lr=2e-4,
    save_every=8, eval_samples=1,
)
"""``--quick``: the same chain, small enough to finish in under two minutes (the tests run it)."""

# Which settings each stage reads; a stage's fingerprint hashes these and the previous stage's fingerprint.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "corpus": ("seed", "n_sft_reviews"),
    "sft": ("vocab_size", "n_layer", "n_embd", "n_head", "max_length", "sft_steps", "sft_batch_size", "sft_lr"),
    "prompts": ("n_train_prompts", "n_eval_prompts"),
    "sample": ("k", "temperature", "max_new_tokens"),
    "score": (),
    "label": (),
    "train": ("align_steps", "align_batch_size", "align_lr", "save_every", "beta_pi", "beta_r", "eps"),
    "eval": ("eval_samples",),
}


def method_name(loss: str, target: str) -> str:
    return f"{loss}-{target}"
