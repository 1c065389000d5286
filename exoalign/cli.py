"""``exoalign <command> …``: a table of subcommands, each the ``main(argv)`` of the module that owns it.

Exit codes: 0 success; 2 bad input or config (one line naming the file, line, field and the fix);
1 anything else.
"""

from __future__ import annotations

import importlib
import os
import sys

from .errors import InputError

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("exoalign.demo.pipeline:main", "EXO vs DPO on controlled sentiment generation, offline, on a CPU"),
    "sft": ("exoalign.stages.sft:main", "supervised fine-tuning on prompt/completion rows"),
    "sample": ("exoalign.stages.sample:main", "sample K completions per prompt (HF generate or vLLM)"),
    "rm": ("exoalign.stages.reward_model:main", "`exoalign rm train`: Bradley-Terry reward model on pairs"),
    "score": ("exoalign.stages.score:main", "fill rewards in group rows from a reward model or an oracle"),
    "label": ("exoalign.stages.label:main", "make preference pairs from scored groups"),
    "train": ("exoalign.train.cli:main", "align a model with EXO / DPO / … on pairs or scored groups"),
    "eval": ("exoalign.eval.evaluate:main", "reward, KL to the SFT policy and win rate of checkpoints"),
    "plot": ("exoalign.eval.plots:main", "`exoalign plot frontier`: reward-KL frontier of several runs"),
    "bench": ("exoalign.bench.cli:main", "`exoalign bench exact`: the exact-optimum benchmark"),
    "model": ("exoalign.zoo:main", "`exoalign model get smollm2`: a pretrained model offline, as safetensors"),
}


def _usage() -> str:
    lines = ["usage: exoalign <command> [options]", "", "commands:"]
    lines += [f"  {name:<7} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Run `exoalign <command> --help` for the options of one command."]
    return "\n".join(lines)


def thread_policy(environ: dict | None = None) -> None:
    """Passive OpenMP waiting unless the user chose a policy or a thread count (set before torch is imported).

    Spin-waiting threads of torch's default policy burn the cores other processes need; on a shared or loaded
    machine that made steps 3-8x slower (docs/speed.md). Has no effect once torch has been imported.
    """
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in env and "OMP_NUM_THREADS" not in env:
        env["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: list[str] | None = None) -> int:
    thread_policy()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"exoalign {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'. Fix: use one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    try:
        entry = getattr(importlib.import_module(module), func)
        if name not in ("plot", "label", "bench"):  # the commands that load models (the others skip the import)
            from .quiet import install

            install()  # transformers' load/save bars and two uninformative warnings off (exoalign/quiet.py)
            from .gemm import choice

            choice()  # a bad EXOALIGN_FP32_MATMUL stops here, before anything is written
        code = entry(rest)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
