"""Shared benchmark plumbing: run one measurement in a fresh process, write JSON + Markdown atomically."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from sparsefit.atomic import write_file_atomically
from sparsefit.text import markdown_table

RESULTS = Path(__file__).parent / "results"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB: ``VmHWM`` where Linux has it, because ``ru_maxrss`` keeps
    the forking parent's RSS across exec (a child of a big process would report the parent's size)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_isolated(script: str, options: list[str], one: list[str], threads: int | None = None) -> dict:
    """Run ``script OPTIONS --one ONE`` in a new process; return the JSON it prints last (its own peak memory)."""
    env = {**os.environ}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, script, *options, "--one", *one], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "failed", "error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_row_options(parser, results: str) -> None:
    """The options of a benchmark that runs named rows, each in its own process: ``--merge`` (keep the other rows of
    ``results``), ``--jobs``, ``--threads`` and the hidden ``--one ROW`` that a row's process is started with."""
    import argparse

    parser.add_argument("--merge", action="store_true", help=f"keep the other rows of {results}")
    parser.add_argument("--jobs", type=int, default=1, help="rows run side by side (one process each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--one", nargs=1, metavar="ROW", help=argparse.SUPPRESS)


def stored_results(name: str, merge: bool) -> dict:
    """``results/<name>.json`` as written so far when ``merge`` (read again at every report: another ``--merge`` run
    beside this one may have added rows), else ``{}``."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if merge and path.exists() else {}


def write_results(name: str, data: dict, header: list[str], rows: list[list], notes: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_file_atomically(RESULTS / f"{name}.json", json.dumps(data, indent=2))
    text = f"# {name}\n\n{notes}\n\n" + markdown_table(header, rows)
    write_file_atomically(RESULTS / f"{name}.md", text)
    print(text)


def run_many(script: str, options: list[str], jobs: dict[str, list[str]], parallel: int, threads: int | None,
             on_done) -> dict[str, dict]:
    """Run each ``jobs[key]`` isolated, ``parallel`` at a time; ``on_done(results)`` after each one finishes.

    On two cores, two one-thread processes beat one two-thread process (measured: 0.22 s vs 0.30 s per EBFT
    step under load), so the benchmarks can spread their settings over the cores.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    results: dict[str, dict] = {}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(run_isolated, script, options, one, threads): key for key, one in jobs.items()}
        for future in as_completed(futures):
            key = futures[future]
            results[key] = future.result()
            # The whole result goes to the log first: a report that fails must not lose a row that took minutes.
            print(f"finished {key}: {results[key].get('status')} {json.dumps(results[key])}", file=sys.stderr,
                  flush=True)  # fmt: skip
            on_done({k: results[k] for k in jobs if k in results})
    return results
