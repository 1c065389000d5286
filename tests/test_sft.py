"""``exoalign sft``: the loss is the NLL of completion tokens only, and training lowers held-out NLL."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from exoalign.cli import main as cli_main
from exoalign.config import load_config
from exoalign.data import GroupCollator, load_rows, tokenize_rows
from exoalign.models import build_model, load_tokenizer, tiny_config, train_bpe_tokenizer
from exoalign.stages.sft import SFTConfig, sft, sft_loss
from exoalign.train.engine import read_metrics
from exoalign.train.loop import split_heldout

ROOT = Path(__file__).resolve().parents[1]
SFT_SMOKE = ROOT / "configs" / "sft_smoke.yaml"



def test_loss_is_completion_token_nll():
    """Golden: the mean over completion tokens (EOS included) of −log softmax(logits)[next token], from the
    full [B, T, V] log-softmax — prompt and padding positions do not count."""
    rows = [{"prompt": "Review of the film:", "completion": " the plot was good."},
            {"prompt": "Review of the book, a long one:", "completion": " bad."}]
    tok = train_bpe_tokenizer([t for r in rows for t in r.values()] * 4, vocab_size=270)
    model = build_model(tiny_config(len(tok), n_positions=64), seed=1, tokenizer=tok).eval()
    data = tokenize_rows(rows, tok, max_length=40, max_prompt_length=20)
    batch = GroupCollator(tok.pad_token_id)(list(data))
    with torch.no_grad():
        loss, metrics = sft_loss(model, batch)
        total, count = 0.0, 0
        for f in data:
            ids = torch.tensor([f["prompt_ids"] + f["completion_ids"][0]])
            logp = model(ids).logits[0, :-1].log_softmax(-1)  # (T-1, V)
            P = len(f["prompt_ids"])
            targets = ids[0, P:]
            total += -float(logp[P - 1 :].gather(-1, targets[:, None]).sum())
            count += len(targets)
    assert float(loss) == pytest.approx(total / count, abs=1e-4)
    assert float(metrics["ppl"]) == pytest.approx(math.exp(total / count), rel=1e-4)


def _heldout_nll(model_dir: Path, cfg: SFTConfig) -> float:
    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = load_rows(cfg.data.train_file, "sft")
    _, held = split_heldout(rows, cfg.data, cfg.train.seed, "sft", tok)
    data = tokenize_rows(held, tok, max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    with torch.no_grad():
        return float(sft_loss(model, GroupCollator(tok.pad_token_id)(list(data)))[0])


def test_sft_from_scratch_lowers_heldout_nll(tmp_path):
    cfg = load_config(SFTConfig, SFT_SMOKE, [f"train.output_dir={tmp_path / 'sft'}", "train.max_steps=25",
                                             "train.log_every=5", "data.max_length=40"])
    final = sft(cfg)
    before, after = _heldout_nll(final.parent / "init", cfg), _heldout_nll(final, cfg)
    assert before > math.log(200)  # a random model over a 300-token vocabulary: ~log 300 nats per token
    assert after < before - 2.0
    recs = read_metrics(final.parent)
    assert recs[-1]["eval/loss"] == pytest.approx(after, abs=1e-3)  # the reloaded model = the trained one
    train_losses = [r["loss"] for r in recs if "loss" in r]
    assert train_losses[-1] < train_losses[0] - 1.0


def test_sft_cli_fine_tunes_a_saved_model(tmp_path, tiny_model_dir, capsys):
    """``exoalign sft`` on a pretrained directory (the conftest tiny GPT-2), via the CLI table."""
    out = tmp_path / "ft"
    code = cli_main(["sft", "--config", str(SFT_SMOKE), "model.init=pretrained", f"model.name_or_path={tiny_model_dir}",
                     f"train.output_dir={out}", "train.max_steps=3", "train.save_every=0", "data.eval_fraction=0"])
    assert code == 0
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "COMPLETE").is_file()
    assert not list(out.glob("checkpoint-*"))  # save_every=0: only final (it records its step)
    assert json.loads((out / "final" / "trainer_state.json").read_text())["step"] == 3
    assert not (out / "init").exists()
    assert len([r for r in read_metrics(out) if "loss" in r]) == 1  # log_every=5: only the last step
