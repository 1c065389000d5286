"""The demo's job pool: prerequisites are respected, a free worker takes the first ready job, workers get the
allocator settings, and a bad order is refused."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import pytest

from exoalign.demo.jobs import WORKER_MALLOC, WORKER_PRELOAD, Job, run_jobs, start_worker_server


def _started_with(key: str) -> str | None:
    """``key`` in the environment this process was started with (what glibc's allocator read; a forked worker's is
    its server's), "" when absent; None where /proc is not there to say."""
    try:
        raw = Path("/proc/self/environ").read_bytes().decode(errors="replace")
    except OSError:
        return None
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv).get(key, "")


def record(path: str, name: str, seconds: float) -> None:
    """A job: note start and end times (and the worker's pid and allocator setting) in a JSON file."""
    start = time.time()
    time.sleep(seconds)
    Path(path).write_text(json.dumps({"name": name, "start": start, "end": time.time(), "pid": os.getpid(),
                                      "ppid": os.getppid(), "trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
                                      "preloaded": sorted(m for m in WORKER_PRELOAD if m in sys.modules),
                                      "probe": os.environ.get("EXOALIGN_TEST_PROBE"),
                                      "started_trim": _started_with("MALLOC_TRIM_THRESHOLD_")}))


def _jobs(tmp_path: Path, spec: list[tuple[str, float, tuple[str, ...]]], finished: list[str]) -> list[Job]:
    return [Job(name, record, (str(tmp_path / f"{name}.json"), name, sec), tmp_path / "logs" / f"{name}.log",
                progress=lambda: 0, total=1, on_done=lambda s, c, e, name=name: finished.append(name), after=after)
            for name, sec, after in spec]


def _times(tmp_path: Path, names: list[str]) -> dict[str, dict]:
    return {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in names}


def test_prerequisites_and_first_ready_job(tmp_path: Path) -> None:
    # Two workers. A long training, a short one; the evaluations of each need their training; "eval sft" needs
    # nothing. The short training's evaluation must start before the long training ends (one pool, no stage
    # barrier), and no evaluation may start before its training ended.
    spec = [("train long", 4.0, ()), ("train short", 0.5, ()),
            ("eval long", 0.2, ("train long",)), ("eval short", 0.2, ("train short",)), ("eval sft", 0.2, ())]
    finished: list[str] = []
    user_set = "MALLOC_TRIM_THRESHOLD_" in os.environ
    run_jobs(_jobs(tmp_path, spec, finished), "test", workers=2)
    t = _times(tmp_path, [n for n, _, _ in spec])
    assert sorted(finished) == sorted(n for n, _, _ in spec)
    assert t["eval long"]["start"] >= t["train long"]["end"]
    assert t["eval short"]["start"] >= t["train short"]["end"]
    assert t["eval short"]["end"] < t["train long"]["end"]  # ran beside the long training
    assert t["eval sft"]["end"] < t["train long"]["end"]
    assert finished.index("train long") < finished.index("eval long")
    for n in t:  # the workers got the allocator settings (unless the user set their own); this process did not
        assert user_set or t[n]["trim"] == WORKER_MALLOC["MALLOC_TRIM_THRESHOLD_"]
        # ... in the environment their process started with, which is what the allocator reads
        assert user_set or t[n]["started_trim"] in (None, WORKER_MALLOC["MALLOC_TRIM_THRESHOLD_"])
    assert ("MALLOC_TRIM_THRESHOLD_" in os.environ) == user_set


def test_one_worker_runs_in_list_order(tmp_path: Path) -> None:
    spec = [("a", 0.0, ()), ("b", 0.0, ("a",)), ("c", 0.0, ("z",))]  # "z" is not in the call: done already
    finished: list[str] = []
    run_jobs(_jobs(tmp_path, spec, finished), "test", workers=1)
    assert finished == ["a", "b", "c"]


def test_a_prerequisite_after_its_dependant_is_refused(tmp_path: Path) -> None:
    spec = [("eval", 0.0, ("train",)), ("train", 0.0, ())]
    with pytest.raises(ValueError, match="needs \\['train'\\]"):
        run_jobs(_jobs(tmp_path, spec, []), "test", workers=2)
    with pytest.raises(ValueError, match="duplicate"):
        run_jobs(_jobs(tmp_path, [("a", 0.0, ()), ("a", 0.0, ())], []), "test", workers=2)


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(), reason="no fork server here")
def test_workers_are_forked_from_a_server_that_imported_the_jobs_modules(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # The workers come from the fork server (their parent is not this process), which imported the trainer, the
    # evaluation and the models' code before forking them: a worker starts with them loaded (a spawned worker
    # would have imported none of them before its job ran), and still with the allocator settings.
    assert start_worker_server()
    assert start_worker_server()  # idempotent
    # Set after the server started: the jobs still see it (and not a variable unset since), as a spawned worker would.
    monkeypatch.setenv("EXOALIGN_TEST_PROBE", str(tmp_path))
    spec = [("a", 0.3, ()), ("b", 0.3, ()), ("c", 0.0, ("a",))]
    finished: list[str] = []
    run_jobs(_jobs(tmp_path, spec, finished), "test", workers=2)
    t = _times(tmp_path, ["a", "b", "c"])
    assert sorted(finished) == ["a", "b", "c"]
    assert len({t[n]["pid"] for n in t}) >= 2  # two workers ran
    for n in t:
        assert t[n]["ppid"] != os.getpid() and t[n]["pid"] != os.getpid()
        assert t[n]["preloaded"] == sorted(WORKER_PRELOAD), t[n]["preloaded"]
        assert t[n]["probe"] == str(tmp_path)
        assert "MALLOC_TRIM_THRESHOLD_" in os.environ or t[n]["started_trim"] in (
            None, WORKER_MALLOC["MALLOC_TRIM_THRESHOLD_"])
