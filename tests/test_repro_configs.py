"""The paper-reproduction configs (configs/imdb, configs/tldr, configs/hh) cannot rot.

1. Every YAML loads into its stage's config unchanged and holds the paper's hyper-parameters.
2. Every line of each ``run.sh`` runs end to end — prepare → sft → (rm train) → sample → score → (label) →
   train ×4 → eval → plot — exactly as written, with only the model, the data source and the sizes swapped for
   tiny local ones by ``key=value`` overrides.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
from pathlib import Path

import pytest
import torch

from exoalign.cli import main as cli
from exoalign.config import load_config

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("imdb", "tldr", "hh")




def _config_class(stem: str) -> type:
    from exoalign.eval.evaluate import EvalConfig
    from exoalign.stages.label import LabelConfig
    from exoalign.stages.reward_model import RMConfig
    from exoalign.stages.sample import SampleConfig
    from exoalign.stages.score import ScoreConfig
    from exoalign.stages.sft import SFTConfig
    from exoalign.train.config import TrainConfig

    classes = {"sft": SFTConfig, "rm": RMConfig, "sample": SampleConfig, "score": ScoreConfig,
               "label": LabelConfig, "eval": EvalConfig}
    return classes.get(stem, TrainConfig)


def _commands(setting: str) -> list[list[str]]:
    lines = (REPO / "configs" / setting / "run.sh").read_text(encoding="utf-8").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.startswith(("#", "set "))]


def test_configs_hold_the_paper_hyperparameters():
    cfgs = {}
    for setting in SETTINGS:
        for path in sorted((REPO / "configs" / setting).glob("*.yaml")):
            cfgs[(setting, path.stem)] = load_config(_config_class(path.stem), path)
    beta = {"imdb": 0.1, "tldr": 0.5, "hh": 0.5}
    batch = {"imdb": 64, "tldr": 128, "hh": 128}
    base = {"imdb": "gpt2-large", "tldr": "EleutherAI/pythia-2.8b", "hh": "EleutherAI/pythia-2.8b"}
    for setting in SETTINGS:
        assert cfgs[(setting, "sft")].model.name_or_path == base[setting]
        for variant in ("exo_rw", "dpo_rw", "exo_pref", "dpo_pref"):
            c = cfgs[(setting, variant)]
            assert (c.loss.name, c.loss.target) == tuple(variant.split("_"))
            assert c.loss.beta_pi == c.loss.beta_r == beta[setting]
            assert c.train.lr == 1e-6 and c.train.batch_size * c.train.grad_accum == batch[setting]
            assert c.loss.temperature == 0.8 and c.data.k == 2
            assert c.model.name_or_path == f"runs/{setting}/sft/final"
            assert c.loss.eps == pytest.approx(1 / (1 + math.exp(10)), rel=1e-4)  # the authors' (0, -10) targets
        sample, ev = cfgs[(setting, "sample")], cfgs[(setting, "eval")]
        assert sample.k == 2 and sample.temperature == ev.temperature == 0.8
        assert ev.sft_model == f"runs/{setting}/sft/final" and len(ev.checkpoints) == 5
    assert cfgs[("imdb", "score")].reward_model == cfgs[("imdb", "eval")].reward_model  # the oracle judges both
    assert cfgs[("tldr", "rm")].data.eval_file == "data/tldr/pairs_test.jsonl"


# ------------------------------------------------------------------------------------ end to end
def _raw_data(root: Path, corpus: list[str]) -> dict[str, list[str]]:
    """Tiny local stand-ins for the hub datasets, in the hub's schemas; returns each setting's prepare args."""
    def jsonl(path: Path, rows: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    for split, n in (("train", 16), ("test", 8)):
        jsonl(root / "imdb" / f"{split}.jsonl",
              [{"text": f"{corpus[i % 8]}<br /><br />{corpus[(i + 3) % 8]}", "label": i % 2} for i in range(n)])
        jsonl(root / "tldr_sft" / f"{split}.jsonl",
              [{"subreddit": "movies", "title": f"film {i}", "post": corpus[i % 8], "summary": corpus[(i + 1) % 8][:24]}
               for i in range(n)])
        jsonl(root / "hh" / f"{split}.jsonl",
              [{"chosen": f"\n\nHuman: {corpus[i % 8]}?\n\nAssistant: {corpus[(i + 2) % 8]}",
                "rejected": f"\n\nHuman: {corpus[i % 8]}?\n\nAssistant: {corpus[(i + 5) % 8]}"} for i in range(n)])
    for split, n in (("train", 16), ("validation", 8)):
        rows = [{"info": {"post": corpus[i % 8], "title": f"film {i}", "subreddit": "movies"},
                 "summaries": [{"text": corpus[(i + 1) % 8][:20]}, {"text": corpus[(i + 4) % 8][:20]}],
                 "choice": i % 2} for i in range(n)]
        rows.append({"info": {"post": None, "article": "a news article", "title": "t", "subreddit": None},
                     "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0})  # CNN/DM row: left out
        jsonl(root / "tldr_pref" / f"{split}.jsonl", rows)
    return {"imdb": ["--source", str(root / "imdb")],
            "tldr": ["--sft-source", str(root / "tldr_sft"), "--pref-source", str(root / "tldr_pref")],
            "hh": ["--source", str(root / "hh")]}


def _classifier(path: Path, tokenizer) -> Path:
    """A tiny two-label sentiment classifier standing in for the IMDB oracle."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=256, num_labels=2,
                     pad_token_id=tokenizer.pad_token_id, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                     label2id={"NEGATIVE": 0, "POSITIVE": 1})
    torch.manual_seed(0)
    GPT2ForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _overrides(stage: str, tmp: Path, tiny: Path, classifier: Path) -> list[str]:
    small_train = ["train.max_steps=1", "train.batch_size=2", "train.grad_accum=1", "train.cpu=true",
                   'train.mixed_precision="no"', "train.save_every=0", "train.log_every=1", "data.max_length=40",
                   "data.max_prompt_length=16", "model.gradient_checkpointing=false",
                   f"train.ref_cache_dir={tmp / 'cache'}"]
    judge = ["judge_max_length=40", "judge_max_prompt_length=16", "device=cpu"]
    oracle = [f"reward_model={classifier}", "judge_revision=null"]
    return {
        "sft": [*small_train, f"model.name_or_path={tiny}"],
        "rm": [*small_train, f"model.name_or_path={tiny}"],
        "train": small_train,
        "sample": ["device=cpu", "max_new_tokens=6", "max_prompts=6", "batch_size=6", "max_prompt_length=16"],
        "score": judge,
        "score-imdb": [*judge, *oracle],
        "eval": [*judge, "max_prompts=3", "samples_per_prompt=1", "max_new_tokens=6", "max_prompt_length=16",
                 "batch_size=3", "n_bootstrap=100"],
        "eval-imdb": [*judge, *oracle, "max_prompts=3", "samples_per_prompt=1", "max_new_tokens=6",
                      "max_prompt_length=16", "batch_size=3", "n_bootstrap=100"],
    }.get(stage, [])


def _prepare(script: Path, argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location(f"prepare_{script.parent.name}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.mark.slow
@pytest.mark.parametrize("setting", SETTINGS)
def test_run_sh_end_to_end_on_tiny_models(setting, tmp_path, monkeypatch, tiny_model_dir, tiny_tokenizer, corpus):
    prepare_args = _raw_data(tmp_path / "raw", corpus)[setting]
    classifier = _classifier(tmp_path / "classifier", tiny_tokenizer)
    (tmp_path / "configs").symlink_to(REPO / "configs")  # run.sh paths are relative to the repository root
    monkeypatch.chdir(tmp_path)
    ran = []
    for argv in _commands(setting):
        if argv[0] == "python":
            extra = prepare_args + (["--tokenizer", str(tiny_model_dir)] if setting == "imdb" else [])
            assert _prepare(REPO / argv[1], argv[2:] + extra) == 0, argv
        else:
            assert argv[0] == "exoalign", argv
            stage = argv[1]
            key = f"{stage}-{setting}" if f"{stage}-{setting}" in ("score-imdb", "eval-imdb") else stage
            assert cli(argv[1:] + _overrides(key, tmp_path, tiny_model_dir, classifier)) == 0, argv
        ran.append(argv[1] if argv[0] == "exoalign" else "prepare")
    assert ran[:2] == ["prepare", "sft"] and ran.count("train") == 4 and ran[-2:] == ["eval", "plot"]

    data = json.loads((tmp_path / "results" / setting / "eval.json").read_text())
    runs = list(dict.fromkeys(r["run"] for r in data["results"]))
    assert data["complete"] and runs == ["sft", "exo_rw", "dpo_rw", "exo_pref", "dpo_pref"]
    sft = data["results"][0]
    assert sft["kl"] == 0.0 and sft["kl_k3"] == 0.0
    for r in data["results"][1:]:
        assert r["kl_k3"] >= 0 and math.isfinite(r["kl"]) and 0 <= r["win_rate"]["mean"] <= 1
    assert (tmp_path / "results" / setting / "frontier.png").stat().st_size > 5000
    assert len((tmp_path / "results" / setting / "frontier.md").read_text().splitlines()) == 2 + len(data["results"])
    scored = [json.loads(line) for line in (tmp_path / "data" / setting / "scored.jsonl").open()]
    assert len(scored) == 6 and all(len(r["rewards"]) == 2 for r in scored)
