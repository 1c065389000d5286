"""``exoalign rm train``: a Bradley–Terry reward model beats chance on held-out pairs and reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from exoalign.config import load_config
from exoalign.data import GroupCollator, load_rows, tokenize_rows
from exoalign.models import load_tokenizer
from exoalign.stages.reward_model import RMConfig, as_pairs, bt_loss, scores, train_reward_model
from exoalign.train.engine import read_metrics
from exoalign.train.loop import split_heldout

ROOT = Path(__file__).resolve().parents[1]
SFT_SMOKE = ROOT / "configs" / "sft_smoke.yaml"



def test_bt_loss_golden():
    """Scores (2, −1) and (0, 0.5): L = mean(−log σ(3), −log σ(−0.5)) = mean(0.04859, 0.97408)."""

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask, position_ids, use_cache):
            return type("Out", (), {"logits": torch.tensor([[2.0], [-1.0], [0.0], [0.5]])})()

    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3),
             "group_mask": torch.ones(2, 2, dtype=torch.bool)}
    loss, m = bt_loss(Fixed(), batch)
    assert float(loss) == pytest.approx((0.048587 + 0.974077) / 2, abs=1e-5)
    assert float(m["rewards/accuracies"]) == 0.5 and float(m["rewards/margins"]) == pytest.approx(1.25)


def test_groups_become_best_vs_worst_pairs():
    rows = load_rows(ROOT / "configs" / "data" / "toy_groups.jsonl", "group")[:5]
    pairs = as_pairs(rows, "toy_groups.jsonl")
    for row, pair in zip(rows, pairs):
        best = max(range(4), key=lambda i: row["rewards"][i])
        assert pair["completions"][0] == row["completions"][best] and pair["rewards"] == [2.0, 0.0]


def test_reward_model_beats_chance_on_heldout_pairs(tmp_path):
    cfg = load_config(RMConfig, SFT_SMOKE, [
        "data.train_file=configs/data/toy_pairs.jsonl", f"train.output_dir={tmp_path / 'rm'}", "train.max_steps=25",
        "data.eval_fraction=0.25", "data.max_length=40", "train.log_every=5", "train.save_every=0"])
    final = train_reward_model(cfg)
    result = json.loads((final.parent / "eval.json").read_text())
    assert result["pairs"] == 24
    assert result["accuracy"] >= 0.75  # chance is 0.5; P(≥ 18 of 24 by chance) < 0.012

    # The saved model reloads as a one-output sequence classifier with the same scores.
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert model.config.num_labels == 1
    tok = load_tokenizer(str(final))
    _, held = split_heldout(load_rows(cfg.data.train_file, "preference"), cfg.data, cfg.train.seed, "preference", tok)
    data = tokenize_rows(as_pairs(held, "x"), tok, max_length=40, max_prompt_length=16)
    batch = GroupCollator(tok.pad_token_id)(list(data))
    with torch.no_grad():
        r = scores(model, batch["input_ids"], batch["attention_mask"]).view(-1, 2)  # (24, 2)
    assert float((r[:, 0] > r[:, 1]).float().mean()) == pytest.approx(result["accuracy"], abs=1e-6)
    assert float((r[:, 0] - r[:, 1]).mean()) == pytest.approx(read_metrics(final.parent)[-1]["eval/rewards/margins"], abs=1e-3)
