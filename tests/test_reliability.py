"""Issue 8, bad input: every command that reads data or config answers a bad file, field, value or flag with exit
code 2 and exactly one ``error:`` line naming the file (and line / field), before it writes anything.

All cases run in-process through ``exoalign.cli.main`` (the same path as the console script, without the cost of a
fresh interpreter per case); ``tests/test_cli.py`` checks the subprocess exit code once. The output area of each
case is its own empty ``tmp_path``, which must still be empty afterwards: no output file, ``.meta.json``, temp
file, run directory or cache entry is left behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from exoalign.cli import main as cli

G = '{"prompt": "p", "completions": ["x", "y"], "rewards": [1, 2]}\n'  # a good group row
S = '{"prompt": "p", "completion": "c"}\n'  # a good sft row
P = '{"prompt": "p"}\n'  # a good prompt row
JUDGE = "def f(prompts, completions):\n    return [float(len(c)) for c in completions]\n"


@dataclass
class Workspace:
    root: Path
    model: Path
    judge: str

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir) -> Workspace:
    root = tmp_path_factory.mktemp("inputs")
    (root / "judge.py").write_text(JUDGE, encoding="utf-8")
    return Workspace(root, tiny_model_dir, f"oracle={root / 'judge.py'}:f")


# Each command as argv for (workspace, input file, empty output area).
Argv = Callable[[Workspace, Path, Path], list[str]]
COMMANDS: dict[str, Argv] = {
    "train": lambda w, f, o: ["train", f"model.name_or_path={w.model}", f"data.train_file={f}", "train.cpu=true",
                              f"train.output_dir={o / 'run'}", f"train.ref_cache_dir={o / 'cache'}"],
    "rm": lambda w, f, o: ["rm", "train", f"model.name_or_path={w.model}", f"data.train_file={f}", "train.cpu=true",
                           f"train.output_dir={o / 'run'}"],
    "sft": lambda w, f, o: ["sft", f"model.name_or_path={w.model}", f"data.train_file={f}", "train.cpu=true",
                            f"train.output_dir={o / 'run'}"],
    "sample": lambda w, f, o: ["sample", f"model={w.model}", f"prompts={f}", f"output={o / 's.jsonl'}", "device=cpu"],
    "score": lambda w, f, o: ["score", f"input={f}", f"output={o / 's.jsonl'}", w.judge, "device=cpu"],
    "label": lambda w, f, o: ["label", f"input={f}", f"output={o / 'l.jsonl'}"],
    "eval": lambda w, f, o: ["eval", f"checkpoints=[{w.model}]", f"sft_model={w.model}", f"prompts={f}",
                             f"output={o / 'e.json'}", w.judge, "device=cpu", "max_new_tokens=2"],
}
# Which row kind each command reads, and a good input file of that kind.
READS = {"train": "preference", "rm": "preference", "score": "preference", "label": "preference", "sft": "sft",
         "sample": "prompt", "eval": "prompt"}
GOOD = {"preference": G + G, "sft": S + S, "prompt": P + '{"prompt": "q"}\n'}

# (case, file content, what the error line must say); the bad row is line 2 of the file.
DATA_CASES: dict[str, list[tuple[str, str | bytes | None, list[str]]]] = {
    "preference": [
        ("malformed-json", G + '{"prompt": "p", "completions": [\n', [":2: malformed JSON"]),
        ("missing-field", G + '{"prompt": "p", "rewards": [1, 2]}\n', [":2: field 'completions': missing"]),
        ("misspelt-field", G + '{"promt": "p", "completions": ["x", "y"]}\n', [":2: field 'prompt'", "'promt'"]),
        ("wrong-type", G + '{"prompt": "p", "completions": "x y"}\n', [":2: field 'completions'", "list"]),
        ("empty-prompt", G + '{"prompt": " ", "completions": ["x", "y"]}\n', [":2: field 'prompt': is empty"]),
        ("empty-completion", G + '{"prompt": "p", "completions": ["x", ""]}\n', [":2: field 'completions[1]': is empty"]),
        ("one-completion", G + '{"prompt": "p", "completions": ["x"]}\n', [":2: field 'completions'", "at least 2"]),
        ("rewards-length", G + '{"prompt": "p", "completions": ["x", "y"], "rewards": [1]}\n',
         [":2: field 'rewards': has 1 values"]),
        ("nan-reward", G + '{"prompt": "p", "completions": ["x", "y"], "rewards": [NaN, 1]}\n',
         [":2: field 'rewards[0]': is not finite (nan)"]),
        ("inf-reward", G + '{"prompt": "p", "completions": ["x", "y"], "rewards": [1, -Infinity]}\n',
         [":2: field 'rewards[1]': is not finite (-inf)"]),
        ("non-utf8", (G + '{"prompt": "caf\xe9", "completions": ["x", "y"]}\n').encode("latin-1"), [":2: bytes that are not UTF-8"]),
        ("empty-file", "", [": the file is empty"]),
        ("missing-file", None, [": no such file or directory"]),
    ],
    "sft": [
        ("malformed-json", S + '{"prompt": "p", "completion": "c"\n', [":2: malformed JSON"]),
        ("missing-field", S + '{"prompt": "p"}\n', [":2: field 'completion': missing"]),
        ("misspelt-field", S + '{"prompt": "p", "completoin": "c"}\n', [":2: field 'completion'", "'completoin'"]),
        ("wrong-type", S + '{"prompt": "p", "completion": 3}\n', [":2: field 'completion'"]),
        ("empty-prompt", S + '{"prompt": "", "completion": "c"}\n', [":2: field 'prompt': is empty"]),
        ("empty-completion", S + '{"prompt": "p", "completion": "\\n"}\n', [":2: field 'completion': is empty"]),
        ("non-utf8", S.encode() + b'{"prompt": "\xff", "completion": "c"}\n', [":2: bytes that are not UTF-8"]),
        ("empty-file", "\n\n", [": the file is empty"]),
        ("missing-file", None, [": no such file or directory"]),
    ],
    "prompt": [
        ("malformed-json", P + '{"prompt": }\n', [":2: malformed JSON"]),
        ("not-an-object", P + '["p"]\n', [":2: a row must be a JSON object"]),
        ("misspelt-field", P + '{"promt": "p"}\n', [":2: field 'prompt'", "'promt'"]),
        ("wrong-type", P + '{"prompt": 3}\n', [":2: field 'prompt'"]),
        ("empty-prompt", P + '{"prompt": "  "}\n', [":2: field 'prompt': is empty"]),
        ("non-utf8", P.encode() + b'{"prompt": "\xc3("}\n', [":2: bytes that are not UTF-8"]),
        ("empty-file", "", [": the file is empty"]),
        ("missing-file", None, [": no such file or directory"]),
    ],
}
DATA_MATRIX = [
    pytest.param(cmd, case, content, needles, id=f"{cmd}-{case}")
    for cmd, kind in READS.items()
    for case, content, needles in DATA_CASES[kind]
]


def one_error_line(capsys) -> str:
    """The whole of stderr, which must be exactly one line starting with ``error:``."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and err.endswith("\n"), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(("cmd", "case", "content", "needles"), DATA_MATRIX)
def test_bad_data_exits_2_with_one_line_and_writes_nothing(ws, tmp_path, capsys, cmd, case, content, needles):
    path = ws.root / f"{cmd}-{case}.jsonl"
    if content is not None:
        ws.file(path.name, content)
    assert cli(COMMANDS[cmd](ws, path, tmp_path)) == 2
    line = one_error_line(capsys)
    assert f"error: {path}:" in line  # names the file first
    for needle in needles:
        assert needle in line, line
    assert "Fix:" in line
    assert list(tmp_path.iterdir()) == []


# (command, overrides, what the error line must say). Each is refused while the config is read or checked.
CONFIG_MATRIX = [
    ("train", ["loss.name=exoo"], "field 'loss.name': unknown loss 'exoo'"),
    ("train", ["loss.eps=0"], "field 'loss.eps'"),
    ("train", ["loss.eps=0.5"], "field 'loss.eps'"),
    ("train", ["loss.beta_pi=0"], "field 'loss.beta_pi': must be > 0"),
    ("train", ["loss.beta_r=-1"], "field 'loss.beta_r': must be > 0"),
    ("train", ["loss.beta_pi=.nan"], "field 'loss.beta_pi'"),
    ("train", ["data.k=1"], "field 'data.k': K must be at least 2"),
    ("train", ["loss.target=pref", "data.k=4"], "field 'data.k'"),
    ("train", ["loss.epss=0.1"], "field 'loss.epss': unknown config key. Fix: did you mean 'eps'?"),
    ("train", ["trian.lr=1"], "field 'trian': unknown config key. Fix: did you mean 'train'?"),
    ("train", ["train.lr=fast"], "field 'train.lr': must be a number"),
    ("train", ["train.nan_policy=ignore"], "field 'train.nan_policy'"),
    ("train", ["--bogus-flag"], "field 'bogus_flag': unknown config key"),
    ("train", ["lr"], "cannot read override 'lr'"),
    ("train", ["data.eval_fraction=0.9"], "field 'data.eval_fraction': holding out 2 of the 2 rows leaves none"),
    ("train", ["model.name_or_path=./no-such-model"], "error: ./no-such-model: field 'model.name_or_path': no such model"),
    ("sample", ["model=./no-such-model"], "error: ./no-such-model: field 'model': no such model directory"),
    ("eval", ["checkpoints=[./no-such-run]"], "error: ./no-such-run: field 'checkpoints': no such model directory"),
    ("sft", ["data.k=2"], "field 'data.k': unknown config key"),
    ("sft", ["train.batch_size=0"], "field 'train.batch_size'"),
    ("rm", ["data.eval_fraction=1.5"], "field 'data.eval_fraction'"),
    ("sample", ["k=1"], "field 'k': K must be at least 2"),
    ("sample", ["temperature=0"], "field 'temperature'"),
    ("sample", ["--tempreature", "0.7"], "did you mean 'temperature'?"),
    ("sample", ["top_p=2"], "field 'top_p'"),
    ("score", ["rows_per_write=0"], "field 'rows_per_write'"),
    ("score", ["reward_model=somewhere"], "exactly one of reward_model and oracle"),
    ("label", ["method=majority"], "field 'method'"),
    ("label", ["bt_scale=0"], "field 'bt_scale'"),
    ("eval", ["samples_per_prompt=0"], "field 'samples_per_prompt'"),
    ("eval", ["confidence=1.5"], "field 'confidence'"),
    ("eval", ["checkpoints=[]"], "no checkpoints given"),
]


@pytest.mark.parametrize(("cmd", "extra", "needle"), CONFIG_MATRIX, ids=lambda v: str(v)[:40])
def test_bad_config_values_exit_2_with_one_line(ws, tmp_path, capsys, cmd, extra, needle):
    good = ws.file(f"good-{READS[cmd]}.jsonl", GOOD[READS[cmd]])
    assert cli(COMMANDS[cmd](ws, good, tmp_path) + extra) == 2
    line = one_error_line(capsys)
    assert needle in line and "Fix:" in line, line
    assert list(tmp_path.iterdir()) == []


CONFIG_FILES = [
    ("python-tag", "train:\n  lr: !!python/object/apply:os.system ['touch {marker}']\n",
     [":2: YAML tag not allowed", "safe_load"]),
    ("malformed-yaml", "train: {lr: 1\n", [":2: invalid YAML"]),
    ("unknown-key", "train:\n  lr: 1.0e-3\n  warmup: 3\n", [":3: field 'train.warmup': unknown config key",
                                                          "did you mean 'warmup_steps'?"]),
    ("duplicate-key", "train:\n  lr: 1.0e-3\n  lr: 1.0e-4\n", [":3: field 'train.lr': duplicate key"]),
    ("wrong-type", "train:\n  batch_size: [8]\n", [":2: field 'train.batch_size': must be an integer"]),
    ("not-a-mapping", "- train\n", [":1: the config must be a YAML mapping"]),
    ("non-utf8", b"train:\n  output_dir: caf\xe9\n", ["not UTF-8"]),
    ("missing", None, ["config file not found"]),
]


@pytest.mark.parametrize("cmd", ["train", "sft"])
@pytest.mark.parametrize(("case", "text", "needles"), CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_bad_config_files_exit_2_naming_file_and_line(ws, tmp_path, capsys, cmd, case, text, needles):
    """A ``!!python`` tag is never constructed (nothing runs): configs are read with ``yaml.safe_load``."""
    marker = tmp_path / "PWNED"
    config = ws.root / f"{cmd}-{case}.yaml"
    if isinstance(text, str):
        config.write_text(text.replace("{marker}", str(marker)), encoding="utf-8")
    elif text is not None:
        config.write_bytes(text)
    good = ws.file(f"good-{READS[cmd]}.jsonl", GOOD[READS[cmd]])
    assert cli([*COMMANDS[cmd](ws, good, tmp_path), "--config", str(config)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {config}")
    for needle in needles:
        assert needle in line, line
    assert not marker.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("cmd", "text", "needle"),
    [
        ("rm", "train:\n  lr: !!python/object/apply:os.system ['touch {marker}']\n", ":2: YAML tag not allowed"),
        ("sample", "k: !!python/object/apply:os.system ['touch {marker}']\n", ":1: YAML tag not allowed"),
        ("score", "oracle: !!python/name:os.system\n", ":1: YAML tag not allowed"),
        ("label", "methd: best_worst\n", ":1: field 'methd': unknown config key. Fix: did you mean 'method'?"),
        ("eval", "samples_per_prompt: 2\nsamples_per_prompt: 3\n", ":2: field 'samples_per_prompt': duplicate key"),
    ],
    ids=["rm", "sample", "score", "label", "eval"],
)
def test_every_command_reads_configs_the_same_safe_way(ws, tmp_path, capsys, cmd, text, needle):
    marker = tmp_path / "PWNED"
    config = ws.file(f"{cmd}.yaml", text.replace("{marker}", str(marker)))
    good = ws.file(f"good-{READS[cmd]}.jsonl", GOOD[READS[cmd]])
    assert cli([*COMMANDS[cmd](ws, good, tmp_path), "--config", str(config)]) == 2
    assert one_error_line(capsys).startswith(f"error: {config}{needle}")
    assert not marker.exists() and list(tmp_path.iterdir()) == []


def test_yaml_tags_in_overrides_stay_plain_strings(ws, tmp_path, capsys):
    """``key=value`` values are read with ``yaml.safe_load`` too: a tag there is not constructed either."""
    marker = tmp_path / "PWNED"
    good = ws.file("good-prompt.jsonl", GOOD["prompt"])
    evil = f"output=!!python/object/apply:os.system ['touch {marker}']"
    assert cli([*COMMANDS["sample"](ws, good, tmp_path), evil]) == 2
    assert "field 'output': must be a .jsonl file" in one_error_line(capsys)
    assert not marker.exists()


def _eval_json(ws: Workspace, name: str, result: str) -> Path:
    return ws.file(name, '{"schema": "exoalign.eval/1", "run": "r", "results": [' + result + "]}")


GOOD_RESULT = '{"name": "r/final", "step": 4, "kl": 0.5, "kl_k3": 0.4, "reward": {"mean": 1.0, "ci_low": 0.9, "ci_high": 1.1}}'
PLOT_CASES = [
    ("malformed", lambda w: w.file("m.json", '{"schema": '), "not JSON"),
    ("missing", lambda w: w.root / "nope.json", "no such eval JSON"),
    ("empty", lambda w: w.file("e.json", ""), "not JSON"),
    ("non-utf8", lambda w: w.file("u.json", b'{"schema": "\xff"}'), "not JSON"),
    ("not-eval", lambda w: w.file("s.json", '{"schema": "other"}'), "field 'schema'"),
    ("no-results", lambda w: _eval_json(w, "n.json", ""), "field 'results'"),
    ("missing-field", lambda w: _eval_json(w, "f.json", '{"name": "a", "kl": 1, "kl_k3": 1}'),
     "field 'results[0].reward': missing"),
    ("wrong-type", lambda w: _eval_json(w, "t.json", GOOD_RESULT.replace('"kl": 0.5', '"kl": "0.5"')),
     "field 'results[0].kl': must be a finite number"),
    ("nan-kl", lambda w: _eval_json(w, "k.json", GOOD_RESULT.replace('"kl": 0.5', '"kl": NaN')),
     "field 'results[0].kl': must be a finite number"),
    ("inf-reward", lambda w: _eval_json(w, "r.json", GOOD_RESULT.replace('"mean": 1.0', '"mean": Infinity')),
     "field 'results[0].reward'"),
    ("result-not-object", lambda w: _eval_json(w, "o.json", "3"), "field 'results[0]': must be an object"),
    ("bad-win-rate", lambda w: _eval_json(w, "w.json", GOOD_RESULT[:-1] + ', "win_rate": 0.5}'),
     "field 'results[0].win_rate'"),
]


@pytest.mark.parametrize(("case", "make", "needle"), PLOT_CASES, ids=[c[0] for c in PLOT_CASES])
def test_plot_frontier_bad_eval_json(ws, tmp_path, capsys, case, make, needle):
    path = make(ws)
    good = _eval_json(ws, "good.json", GOOD_RESULT)
    assert cli(["plot", "frontier", str(good), str(path), "--output", str(tmp_path / "f.png")]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {path}: ") and needle in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["plot", "frontier", "a.json", "--bogus"], "unrecognized arguments: --bogus"),
        (["plot", "frontier", "a.json", "--kl", "k9"], "invalid choice: 'k9'"),
        (["plot", "frontear", "a.json"], "invalid choice: 'frontear'"),
        (["plot", "frontier", "a.json", "--output", "f.pdf"], "the plot must be a .png file"),
        (["bench", "exact", "--bogus"], "unrecognized arguments: --bogus"),
        (["bench", "exact", "--seed", "one"], "invalid int value: 'one'"),
        (["bench", "exact", "stpes=3"], "did you mean 'steps'?"),
        (["bench", "exact", "--beta", "-1"], "field 'beta'"),
        (["bench", "exact", "ks=[1]"], "field 'ks'"),
        (["bench", "exactt"], "unknown benchmark 'exactt'"),
        (["rm", "trian"], "unknown rm command 'trian'"),
        (["train", "--config"], "argument --config/-c: expected one argument"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, monkeypatch, argv, needle):
    """Usage errors are one ``error:`` line too (argparse's own usage block + SystemExit are not used)."""
    monkeypatch.chdir(tmp_path)  # relative outputs (bench's default --out) would land here
    assert cli(argv) == 2
    assert needle in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_flag_style_overrides_work_for_every_config_command(ws, tmp_path):
    """``--key value`` / ``--key=value`` / ``--section.key value`` are config overrides in every command that
    takes a config (train, sft, rm train, sample, score, label, eval), while real flags (``--resume``) stay flags."""
    from exoalign.config import config_parser, parse_config_args
    from exoalign.train.config import TrainConfig

    cfg = parse_config_args("t", TrainConfig, ["--loss.name", "dpo", "--train.max-steps=7", "--train.cpu",
                                               "data.k=2", "--loss.beta_pi", "0.2"])
    assert (cfg.loss.name, cfg.train.max_steps, cfg.train.cpu, cfg.data.k, cfg.loss.beta_pi) == ("dpo", 7, True, 2, 0.2)
    parser = config_parser("t", TrainConfig)
    parser.add_argument("--resume", action="store_true")
    ns = parser.parse_args(["--resume", "--train.lr", "1e-3", "-c", "x.yaml"])
    assert ns.resume and ns.config == "x.yaml" and ns.overrides == ["train.lr=1e-3"]
    good = ws.file("good-preference.jsonl", GOOD["preference"])
    out = tmp_path / "labels.jsonl"
    assert cli(["label", "--input", str(good), f"--output={out}", "--method", "bradley_terry"]) == 0
    assert out.is_file()


def test_a_model_directory_without_config_is_refused(ws, tmp_path, capsys):
    not_a_model = ws.root  # data files, no config.json
    good = ws.file("good-preference.jsonl", GOOD["preference"])
    assert cli([*COMMANDS["train"](ws, good, tmp_path), f"model.name_or_path={not_a_model}"]) == 2
    assert one_error_line(capsys).startswith(f"error: {not_a_model}: field 'model.name_or_path': not a model directory")
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_resume_record_is_refused(ws, tmp_path, capsys):
    """``sample``/``score`` record their settings in ``<output>.meta.json``; if it cannot be read, nothing says the
    rows already in the output belong to this run: exit 2, and the output is left as it was."""
    good = ws.file("good-prompt.jsonl", GOOD["prompt"])
    out, meta = tmp_path / "s.jsonl", tmp_path / "s.jsonl.meta.json"
    out.write_text('{"prompt": "p", "completions": ["a", "b"]}\n', encoding="utf-8")
    meta.write_text('{"stage": "sam', encoding="utf-8")
    assert cli(COMMANDS["sample"](ws, good, tmp_path)) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {meta}: field 'output': the settings record of {out} is unreadable"), line
    assert "overwrite=true" in line
    assert out.read_text(encoding="utf-8") == '{"prompt": "p", "completions": ["a", "b"]}\n'


def test_errors_found_only_with_the_model_still_exit_2(ws, tmp_path, capsys):
    """LoRA target modules can only be checked against the loaded model: exit 2 and a last ``error:`` line (the
    progress lines before it stay), and no run directory."""
    good = ws.file("good-preference.jsonl", GOOD["preference"])
    assert cli([*COMMANDS["train"](ws, good, tmp_path), "model.lora_r=2", "model.lora_target_modules=[nope]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: field 'model.lora_target_modules': cannot add LoRA adapters"), err
    assert sum(line.startswith("error:") for line in err) == 1 and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run").exists()
