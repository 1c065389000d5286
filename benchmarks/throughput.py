"""Throughput and memory of exoalign's training step against TRL's DPOTrainer on the same EXO job: the harness.

The systems it times live in ``benchmarks/throughput_systems.py``. One run, systems interleaved step by step
(A B C A B C …), each in its own process so that its peak resident memory is its own, in two phases (the
headline systems, then the bf16 and listwise rows) so that fewer SmolLM2-sized processes are alive at once.
Every system trains the same model on the same token ids in the same order, with the same optimiser settings,
on the same number of threads. ``--model gpt2-14m`` (default) is a GPT-2-style 14M-parameter model built from
a config; ``--model smollm2`` is SmolLM2-135M-Instruct (``exoalign.zoo``).

The limit: dense fp32 matmul throughput measured in the same run; model FLOP utilisation is
``(6 × params × policy tokens + 2 × params × reference tokens if not cached) / step time / peak``, with the
tokens a system actually feeds (prompt sharing feeds fewer). Prompt sharing is also timed alone on
summarisation-like groups (prompt 384 tokens, completions 48, K = 2, 4, 8): a forward + backward of the
loss with and without it.

    .venv/bin/python benchmarks/throughput.py                          # 14M job, full run (~15 min on 2 idle cores)
    .venv/bin/python benchmarks/throughput.py --quick --json out.json  # < 3 min
    .venv/bin/python benchmarks/throughput.py --model smollm2 --quick  # SmolLM2-135M (~8 min on 2 idle cores)

``--json`` writes exactly ``speedup_vs_trl_default``, ``speedup_vs_trl_fastest``, ``memory_ratio_vs_trl``,
``mfu``, ``bf16_mfu`` (the bf16 row against the measured bf16 matmul peak), ``mfu_compiled`` and
``bf16_mfu_compiled`` (the same with ``train.compile``; null unless ``exoalign_compiled`` /
``exoalign_compiled_bf16`` ran), ``cpu`` (the CPU's model name),
``loss_match``, ``prefix_sharing``, ``model``, ``params``, ``dtype`` and ``versions``; ``--md`` writes
the Markdown tables. ``--profile`` times no system: it takes one exoalign step apart (phases, operator
families, and the matmul floor: the step's own dense products replayed alone, and the MFU ceiling they set),
fp32 and bf16 autocast; with ``--json`` it writes that instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput_systems import (  # noqa: E402
    LOSS_TOL,
    MODELS,
    Shape,
    make_assets,
    preset,
    profile_step,
    run_prefix,
    worker_main,
)

from exoalign.hardware import KEPT_MALLOC_ENV, user_allocator  # noqa: E402


# ------------------------------------------------------------------------------------------ parent
def worker_allocator() -> str:
    """The workers' allocator settings, in words (the caller's own where it set any)."""
    own = user_allocator()
    if own:
        return f"the caller's ({own} in the environment)"
    return "glibc keeping freed memory (" + " ".join(f"{k}={v}" for k, v in KEPT_MALLOC_ENV.items()) + ")"


class Worker:
    """A worker subprocess speaking the step protocol; its stderr goes to a log file."""

    def __init__(self, system: str, shape: Shape, assets: Path, work: Path) -> None:
        self.system = system
        wdir = work / system
        wdir.mkdir(parents=True, exist_ok=True)
        self.log_path = wdir / "stderr.log"
        # One allocator for every system: glibc keeping its freed memory, as exoalign's trainer asks for itself
        # (exoalign/hardware.py); with these in the environment it leaves glibc alone, and TRL's rows get the same.
        # The caller's own allocator settings (a MALLOC_* variable, a preloaded allocator) win.
        malloc = {} if user_allocator() else KEPT_MALLOC_ENV
        env = {**malloc, **os.environ, "OMP_NUM_THREADS": str(shape.threads), "MKL_NUM_THREADS": str(shape.threads),
               "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "PYTHONPATH": str(Path(__file__).parents[1]),
               # Passive OpenMP waiting for every system alike (exoalign's CLI default): spinning threads on a
               # shared machine made steps several times slower (docs/speed.md).
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        cmd = [sys.executable, __file__, "--worker", system, "--shape", json.dumps(asdict(shape)),
               "--assets", str(assets), "--work", str(wdir)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.log_path, "w"), text=True, env=env)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker {self.system} exited ({self.proc.returncode}); its log ends:\n{tail}")
        return json.loads(line)

    def send(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        self.proc.wait(timeout=120)


@dataclass
class SystemResult:
    name: str
    phase: int = 0
    step_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    final: dict = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)


def load_average() -> float:
    return os.getloadavg()[0]


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_name()}
    for pkg in ("exoalign", "torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            if pkg == "exoalign":
                import exoalign

                out[pkg] = exoalign.__version__
            else:
                out[pkg] = "missing"
    return out


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def run(shape: Shape, *, keep: Path | None = None) -> dict:
    """The whole benchmark; returns the detailed results (see :func:`summary` for the JSON written)."""
    import torch

    with tempfile.TemporaryDirectory(prefix="exoalign-bench-") as tmp:
        work = keep or Path(tmp)
        assets = work / "assets"
        assets.mkdir(parents=True, exist_ok=True)
        t_start, load_start = time.perf_counter(), load_average()
        torch.set_num_threads(shape.threads)
        make_assets(shape, assets)
        from transformers import AutoConfig

        params = _param_count(assets / "policy", AutoConfig)
        results: dict[str, SystemResult] = {}
        loads: list[float] = []
        for phase, systems in enumerate((shape.systems, shape.extra)):
            if systems:
                results.update(run_phase(shape, systems, assets, work, loads, phase))

        # In this process, after the workers are gone: nothing else runs while it is timed.
        pre = run_prefix(shape, assets)
        prefix, peaks = pre["prefix"], pre["peaks"]
        return {"shape": asdict(shape), "params": params, "peak_gflops": max(peaks), "peaks": peaks,
                "peak_gflops_bf16": pre.get("peak_bf16"),
                "systems": {k: asdict(v) | {"median_s": v.median_s} for k, v in results.items()},
                "prefix": prefix, "versions": versions(), "load_start": load_start, "load_end": load_average(),
                "allocator": worker_allocator(),
                "load_during_steps": loads,
                "wall_s": time.perf_counter() - t_start}


def run_phase(shape: Shape, systems: tuple[str, ...], assets: Path, work: Path, loads: list[float],
              phase: int) -> dict[str, SystemResult]:
    """One interleaved phase: the workers start together (setup is not timed), then take turns step by step."""
    workers = [Worker(name, shape, assets, work) for name in systems]
    try:
        for w in workers:
            assert w.read().get("ready"), w.system
        results = {w.system: SystemResult(w.system, phase=phase) for w in workers}
        alive = list(workers)
        last: dict[str, float] = {}  # each system's latest step, for the progress line
        for i in range(shape.warmup + shape.steps):
            for w in list(alive):  # A B C A B C …
                try:
                    msg = w.send("step")
                except (RuntimeError, BrokenPipeError) as e:  # killed (e.g. out of memory): record, go on
                    print(f"warning: {w.system} failed: {str(e).splitlines()[0]}", file=sys.stderr)
                    results[w.system].final = {"error": str(e).splitlines()[0]}
                    alive.remove(w)
                    continue
                r = results[w.system]
                last[w.system] = msg["step_s"]
                r.losses.append(msg["loss"])
                if i >= shape.warmup:
                    r.step_s.append(msg["step_s"])
                    r.cpu_s.append(msg["cpu_s"])
            loads.append(load_average())
            done = ", ".join(f"{k} {t:.2f} s" for k, t in last.items())
            print(f"phase {phase}, {'warm-up' if i < shape.warmup else 'timed'} step {i + 1}/{shape.warmup + shape.steps}:"
                  f" {done} (load {loads[-1]:.2f})", file=sys.stderr, flush=True)
        for w in alive:
            results[w.system].final = w.send("done")
            w.close()
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
    return {k: v for k, v in results.items() if v.step_s and "peak_rss_mb" in v.final}


def _param_count(path: Path, auto_config: Any) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(auto_config.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())


def flops(params: int, final: dict) -> float:
    """Model FLOPs of one step: 6·N per policy token (forward + backward), 2·N per reference token."""
    return 6 * params * final["policy_tokens"] + 2 * params * final["ref_tokens"]


def summary(res: dict) -> dict:
    """The JSON of ``--json``: exactly the keys the checks read."""
    s = res["systems"]
    exo, default, fastest = s["exoalign"], s.get("trl_default"), s.get("trl_fastest")
    # The pair jobs in fp32 must agree on the step-0 loss (bf16 rounds it; the listwise job is another loss).
    loss0 = [v["losses"][0] for k, v in s.items() if k in ("exoalign", "exoalign_unshared", "trl_default",
                                                            "trl_fastest")]
    # Memory against TRL at the same gradient-checkpointing setting as exoalign's (off): TRL's fastest run.
    def mem(v: dict) -> float:
        return v["final"].get("peak_cuda_mb") or v["final"]["peak_rss_mb"]

    trl_mem = mem(fastest) if fastest else None
    mfu = flops(res["params"], exo["final"]) / exo["median_s"] / (res["peak_gflops"] * 1e9)
    # bf16 autocast's step against the measured bf16 matmul peak (None when the row or the peak is missing).
    peak_bf16 = res.get("peak_gflops_bf16")

    def row_mfu(name: str, peak: float | None) -> float | None:
        v = s.get(name)
        return flops(res["params"], v["final"]) / v["median_s"] / (peak * 1e9) if v and peak else None

    bf16_mfu = row_mfu("exoalign_bf16", peak_bf16)
    return {
        "speedup_vs_trl_default": default["median_s"] / exo["median_s"] if default else None,  # None: not run
        "speedup_vs_trl_fastest": fastest["median_s"] / exo["median_s"] if fastest else None,
        "memory_ratio_vs_trl": mem(exo) / trl_mem if fastest else None,
        "mfu": mfu,
        "bf16_mfu": bf16_mfu,
        # the same two with train.compile (inductor, per decoder layer); None when those systems did not run
        "mfu_compiled": row_mfu("exoalign_compiled", res["peak_gflops"]),
        "bf16_mfu_compiled": row_mfu("exoalign_compiled_bf16", peak_bf16),
        "cpu": res["versions"].get("cpu"),
        "loss_match": bool(max(loss0) - min(loss0) <= LOSS_TOL) if len(loss0) > 1 else None,
        "prefix_sharing": {k: v["speedup"] for k, v in res["prefix"].items()},
        "model": res["shape"].get("model", "gpt2-14m"),
        "params": res["params"],
        "dtype": "fp32",
        "versions": res["versions"],
    }


def markdown(res: dict, command: str) -> str:
    """Tables of the full results, with the command and the machine's load."""
    sh, s = res["shape"], res["systems"]
    peak = res["peak_gflops"]
    tok_per_step = sh["pairs"] * 2 * sh["completion_len"]
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {res['versions']['cpu']}, {sh['threads']} threads; load average {res['load_start']:.2f} at the "
        f"start, {max(res['load_during_steps']):.2f} at most during the timed steps, {res['load_end']:.2f} at the "
        f"end; dense fp32 matmul peak {peak:.1f} GFLOP/s "
        f"(measured before and after: {', '.join(f'{p:.1f}' for p in res['peaks'])})"
        + (f", bf16 {res['peak_gflops_bf16']:.1f} GFLOP/s (the MFU limit of the bf16 rows)" if res.get("peak_gflops_bf16")
           else "") + (f"; allocator of every system: {res['allocator']}" if res.get("allocator") else "") + ".  ",
        f"Job: {_model_line(sh, res['params'])}; {sh['pairs']} pairs per step, prompts {sh['prompt_len']} and "
        f"completions {sh['completion_len']} tokens; fp32 unless the row says bf16 (autocast); {sh['steps']} timed "
        f"steps after {sh['warmup']} warm-up per system, interleaved within each phase (phase 0: "
        f"{', '.join(sh['systems'])}; phase 1: {', '.join(sh.get('extra') or ['none'])}; phases run one after "
        "the other, so only rows of one phase are interleaved; exoalign_k4's policy sees 4 completions per prompt).",
        "",
        "| system | phase | median s/step | min s/step | CPU s/step | completion tokens/s | exoalign speedup | peak RSS MiB "
        "| RSS above start MiB | policy + ref tokens/step | MFU | step-0 loss | last-step loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    exo_s = s["exoalign"]["median_s"]
    for name, v in s.items():
        f = v["final"]
        row_peak = res.get("peak_gflops_bf16") if name.endswith("_bf16") and res.get("peak_gflops_bf16") else peak
        mfu = flops(res["params"], f) / v["median_s"] / (row_peak * 1e9)
        lines.append(
            f"| {name} | {v.get('phase', 0)} | {v['median_s']:.3f} | {min(v['step_s']):.3f} | {statistics.median(v['cpu_s']):.2f} "
            f"| {tok_per_step / v['median_s']:.0f} "
            f"| {v['median_s'] / exo_s:.2f}× | {f['peak_rss_mb']:.0f} | {f['peak_rss_mb'] - f['baseline_rss_mb']:.0f} "
            f"| {f['policy_tokens']} + {f['ref_tokens']} | {mfu:.1%} | {v['losses'][0]:.6f} | {v['losses'][-1]:.6f} |"
        )
    lines += ["", f"Prompt sharing, forward + backward of the loss, {sh['prefix_groups']} group(s) per batch, "
              f"prompt {sh['prefix_prompt']} tokens, completions {sh['prefix_completion']}:", "",
              "| K | unshared s | shared s | speedup | loss difference |", "|---|---|---|---|---|"]
    for k, v in res["prefix"].items():
        lines.append(f"| {k} | {v['unshared_s']:.3f} | {v['shared_s']:.3f} | {v['speedup']:.2f}× | {v['loss_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def profile_main(shape: Shape, json_path: Path | None) -> int:
    """``--profile``: one exoalign step of the job, fp32 and (where this machine multiplies bf16 fast) under bf16
    autocast: its phases, its operator families, and its matmul floor (``profile_step``), as tables."""
    import torch

    from exoalign.hardware import fast_bf16

    torch.set_num_threads(shape.threads)
    out: dict[str, Any] = {"cpu": _cpu_name(), "threads": shape.threads, "model": shape.model, "runs": []}
    with tempfile.TemporaryDirectory(prefix="exoalign-profile-") as tmp:
        make_assets(shape, Path(tmp))
        for bf16 in (False, True):
            if bf16 and not fast_bf16(shape.device):
                print(f"bf16 autocast: skipped (no fast bf16 matmul on this {shape.device}; exoalign.hardware.fast_bf16)")
                continue
            prof = profile_step(shape, Path(tmp), bf16=bf16)
            out["runs"].append(prof)
            fl = prof["floor"]
            print(f"\n## {fl['precision']}\n\n| phase of one step | wall s (median) |\n|---|---|")
            for name, t in prof["phases"]:
                print(f"| {name} | {t:.3f} |")
            total = sum(t for _, t in prof["families"])
            print("\n| forward + backward by operator family | self s | share |\n|---|---|---|")
            for fam, t in prof["families"]:
                print(f"| {fam} | {t:.3f} | {t / total:.0%} |")
            print(f"\nMatmul floor: the step's {fl['matmuls']} dense products ({fl['matmul_tflop']:.3f} TFLOP) alone take "
                  f"{fl['matmul_s']:.3f} s ({fl['matmul_gflops']:.0f} GFLOP/s, {fl['matmul_share_of_peak']:.0%} of the "
                  f"{fl['peak_gflops']:.0f} GFLOP/s peak), {fl['matmul_share_of_step']:.0%} of the step's "
                  f"{fl['step_s']:.3f} s. MFU {fl['mfu']:.1%}; with everything else free it would be "
                  f"{fl['mfu_ceiling']:.1%} (the ceiling of this step's matmuls).")
    if json_path:
        _atomic_write(json_path, json.dumps(out, indent=2) + "\n")
    return 0


def _model_line(sh: dict, params: int) -> str:
    if sh.get("model") == "smollm2":
        return f"SmolLM2-135M-Instruct (Llama, 30 layers, vocab {sh['vocab']}, {params / 1e6:.2f} M parameters)"
    return (f"GPT-2-style, {sh['layers']} layers, width {sh['width']}, vocab {sh['vocab']} "
            f"({params / 1e6:.2f} M parameters)")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="gpt2-14m", help="the job's model (default gpt2-14m)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--systems", help="comma-separated systems of the first phase (overrides the preset)")
    p.add_argument("--extra", help="comma-separated systems of the second phase ('' for none)")
    p.add_argument("--quick", action="store_true", help="fewer steps and systems (14M: < 3 min; smollm2: < 8 min)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and job (seconds; for tests)")
    p.add_argument("--json", type=Path, help="write the summary JSON here")
    p.add_argument("--md", type=Path, help="write the Markdown tables here")
    p.add_argument("--details", type=Path, help="write every measurement (JSON) here")
    p.add_argument("--steps", type=int, help="timed steps per system (overrides the preset)")
    p.add_argument("--profile", action="store_true",
                   help="only profile one exoalign step (fp32 and bf16): phases, operator families, matmul floor"
                        " (--json writes it)")
    p.add_argument("--render", type=Path, help="re-render the JSON and tables from a --details file (no run)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--assets", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        d = json.loads(args.shape)
        worker_main(args.worker, Shape(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}),
                    args.assets, args.work)
        return 0
    shape = preset(args.model, quick=args.quick, tiny=args.tiny)
    shape.device = args.device
    if args.systems:
        shape.systems = tuple(args.systems.split(","))
    if args.extra is not None:
        shape.extra = tuple(x for x in args.extra.split(",") if x)
    if args.steps:
        shape.steps = args.steps
    if args.profile:
        return profile_main(shape, args.json)
    command = "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.render:
        res = json.loads(args.render.read_text())
        command = res.get("command", command)
    else:
        res = run(shape)
        res["command"] = command.strip()
    out = summary(res)
    print(markdown(res, command.strip()))
    print(json.dumps(out, indent=2))
    if args.json:
        _atomic_write(args.json, json.dumps(out, indent=2) + "\n")
    if args.md:
        _atomic_write(args.md, markdown(res, command.strip()))
    if args.details:
        _atomic_write(args.details, json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
