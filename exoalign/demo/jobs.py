"""Running the demo's independent jobs (four trainings, five evaluations) side by side, one CPU core each.

Why processes and not threads: the demo's models are tiny, so each matrix product is a few microseconds of
work, and splitting it across cores costs more in synchronisation than it gains — and far more when anything
else runs on the machine (measured: a 1M-parameter training step took 0.2 s of CPU with one thread, up to
1 s with two threads on a busy 2-core machine, spent spinning at barriers). So every job runs with one
intra-op thread, and jobs that do not depend on each other run in parallel processes, one per core.

A job is ``(name, function, args, progress)``: ``function(*args)`` runs in a worker process with its output sent
to a log file; ``progress()`` is polled by the parent for a combined progress bar (e.g. the last
step in a run's ``metrics.jsonl``). A failed job's log tail is printed and the error re-raised.

Jobs may name the jobs they need (``after``: a run's evaluation needs its training): one pool runs them all, a
free worker taking the first job in list order whose prerequisites are done. So the evaluations fill the
cores a stage-by-stage order would leave idle while its last training finishes, and no second pool pays its
process start again.

Start-up: the workers are forked from a server process that imported torch, transformers and the jobs' modules
once (:func:`start_worker_server`, :data:`WORKER_PRELOAD`; multiprocessing's ``forkserver``), not spawned afresh
each paying those imports (~4 s a worker for SmolLM2's stack). The server never runs a tensor operation, so no
OpenMP thread or lock is forked with it (the reason not to fork the parent itself). Where the platform has no
fork server (Windows), the workers are spawned.

Memory: the workers keep the memory they free and take every block from the heap (:data:`WORKER_MALLOC`): a
training step frees and re-allocates the same ~1 GB of gradients, casts and logits every step, and returning it
to the kernel made every step fault it in again (~140 000 page faults; on this project's virtual machines a page
touched afresh is slow, worst when both workers do it at once; docs/speed.md).
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..hardware import KEPT_MALLOC_ENV


@dataclass
class Job:
    name: str
    fn: Callable[..., Any]
    """A module-level function (it is pickled by reference into the worker)."""
    args: tuple
    log: Path
    progress: Callable[[], int]
    """Units done so far (polled in the parent)."""
    total: int
    on_done: Callable[[float, float, dict], None]
    """Called in the parent with the job's wall and CPU seconds and its overheads (:func:`_worker`) on success."""
    after: tuple[str, ...] = ()
    """Names of jobs of the same :func:`run_jobs` call that must finish first (names not in the call: done)."""


WORKER_MALLOC = KEPT_MALLOC_ENV
"""glibc allocator settings of the spawned workers (read when a process starts; other C libraries ignore them):
every block from the heap, none from fresh mappings (glibc maps blocks of 32 MiB and more on their own and unmaps
them when freed, so SmolLM2's embedding-sized gradient, Adam moments and logits were page-faulted in again every
step), and freed memory kept (trim above 16 GiB only, 1 GiB of top padding). A user's own values win."""


WORKER_PRELOAD = (
    "exoalign.demo.pipeline", "exoalign.train.trainer", "exoalign.train.loop", "exoalign.eval.evaluate",
    "exoalign.online.rounds", "exoalign.sampling",
    "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2",
)
"""Modules the workers' server imports before it forks any worker: torch and transformers through them, the
trainer's and the evaluation's own imports (accelerate, datasets, peft), and the modeling code of the demo's
models (SmolLM2 is a Llama; the scratch demo's model a GPT-2). A name that fails to import is skipped there (the
worker imports it itself when a job needs it)."""


def _context() -> Any:
    """The pool's multiprocessing context: ``forkserver`` with :data:`WORKER_PRELOAD` where the platform has it,
    else ``spawn`` (a clean interpreter either way: nothing of this process's torch threads or locks)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(WORKER_PRELOAD))
    return ctx


def start_worker_server() -> bool:
    """Start the process the pool's workers will be forked from, now, with the workers' environment
    (:data:`WORKER_MALLOC`, passive OpenMP waits): its imports (~4 s for SmolLM2's stack) then run on a core this
    process leaves idle while it loads its own modules and the model, instead of delaying the first jobs. Returns
    whether a server runs (False where the platform has none). Idempotent; :func:`run_jobs` starts it if needed."""
    ctx = _context()
    if ctx.get_start_method() != "forkserver":
        return False
    from multiprocessing import forkserver

    with _worker_env({**WORKER_MALLOC, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}):
        forkserver.ensure_running()
    return True


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def one_thread() -> None:
    """One intra-op thread (see the module docstring); set in every demo process, and passive OpenMP waiting
    for the processes it spawns (spinning threads steal the cores of the other jobs)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_JOBS_HERE = 0
"""Jobs this process has started (a pool's worker process runs several)."""


def _process_start_s() -> float | None:
    """Seconds from this process's creation to now: what a worker does before its first job (a spawned one loads
    the interpreter, torch and transformers; one forked from the preloaded server little). None for a later job
    of the same process (it pays none of that)."""
    global _JOBS_HERE
    _JOBS_HERE += 1
    if _JOBS_HERE > 1:
        return None
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except (ImportError, OSError):
        return None


def _adopt_env(env: dict[str, str]) -> None:
    """This process's ``os.environ`` made ``env`` (the parent's when it submitted the job): a worker forked from
    the server was born with the server's environment, and a variable the caller set since (``EXOALIGN_CACHE``,
    ``HF_HOME``) must reach the job as it reached a spawned worker. What C libraries read at their start
    (allocator, OpenMP) is the server's, set by :func:`start_worker_server`."""
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    os.environ.update(env)


def _worker(fn: Callable[..., Any], args: tuple, log: str, spawned: bool = True,
            env: dict[str, str] | None = None) -> tuple[float, float, dict]:
    """Run ``fn(*args)`` with its output in ``log`` (and ``env`` as its environment, see :func:`_adopt_env`);
    return its wall and CPU seconds and its overheads (``process_start_s``: see :func:`_process_start_s`; absent
    when the job runs in the parent), with what ``fn`` returned when that is a dict (e.g. the timings of its
    parts)."""
    if env is not None:
        _adopt_env(env)
    one_thread()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    extra = {"process_start_s": _process_start_s()} if spawned else {}
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with open(log, "w", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            result = fn(*args)
        if isinstance(result, dict):
            extra.update(result)
    finally:
        # The job's model, optimizer state and gradients (GBs, some in reference cycles) freed now, not at the next
        # automatic collection: the worker's next job reuses that memory (WORKER_MALLOC) instead of faulting in new.
        gc.collect()
    return time.perf_counter() - t0, time.process_time() - c0, extra


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return "\n".join(line for line in lines[-n:] if line.strip())


def _ordered(jobs: list[Job]) -> list[Job]:
    """``jobs`` checked: unique names, prerequisites that are in the list come before (no cycles)."""
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate job names in {names}")
    seen: set[str] = set()
    for job in jobs:
        missing = [a for a in job.after if a in names and a not in seen]
        if missing:
            raise ValueError(f"job {job.name!r} needs {missing}, which do not come before it")
        seen.add(job.name)
    return jobs


@contextlib.contextmanager
def _worker_env(env: dict[str, str]):
    """``env`` (where unset) in os.environ while the pool spawns its workers (they inherit it)."""
    added = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def run_jobs(jobs: list[Job], desc: str, workers: int) -> None:
    """Run ``jobs`` on ``workers`` processes (in this process when ``workers`` is 1) with one progress bar; a
    free worker takes the first job (in list order) whose ``after`` jobs are done."""
    if not jobs:
        return
    jobs = _ordered(jobs)
    for job in jobs:
        job.log.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(j.total for j in jobs), desc=desc, unit="step", file=sys.stderr)

    def refresh() -> None:
        bar.n = sum(min(j.progress(), j.total) for j in jobs)
        bar.refresh()

    if workers <= 1:
        for job in jobs:  # list order puts every job after its prerequisites (checked above)
            # In-process: the job's own bars would fight with this one, so its output goes to the log too.
            job.on_done(*_worker(job.fn, job.args, str(job.log), False))
            refresh()
        bar.close()
        return
    names = {j.name for j in jobs}
    done: set[str] = set()
    waiting = list(jobs)
    start_worker_server()  # (no-op when it runs already)
    with _worker_env(WORKER_MALLOC), ProcessPoolExecutor(max_workers=workers, mp_context=_context()) as pool:
        running: dict[Future, Job] = {}

        def start_ready() -> None:
            # At most `workers` in flight, so that a job waits here, in order, and not in the pool's queue.
            for job in list(waiting):
                if len(running) >= workers:
                    return
                if all(a in done or a not in names for a in job.after):
                    waiting.remove(job)
                    running[pool.submit(_worker, job.fn, job.args, str(job.log), True, dict(os.environ))] = job

        start_ready()
        while running:
            finished, _ = wait(set(running), timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                try:
                    job.on_done(*fut.result())
                except BaseException:
                    bar.close()
                    print(f"\n{job.name} failed; the end of its log {job.log}:\n{_tail(job.log)}", file=sys.stderr)
                    for other in running:
                        other.cancel()
                    raise
                done.add(job.name)
            start_ready()
            refresh()
    bar.close()
