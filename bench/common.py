"""Shared benchmark plumbing: run one measurement in a fresh process, write JSON + Markdown atomically."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from sparsefit.evaluate.report import markdown_table
from sparsefit.export.run_folder import write_file_atomically

RESULTS = Path(__file__).parent / "results"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(script: str, options: list[str], one: list[str]) -> dict:
    """Run ``script OPTIONS --one ONE`` in a new process; return the JSON it prints last (its own peak memory)."""
    proc = subprocess.run(
        [sys.executable, script, *options, "--one", *one], capture_output=True, text=True, env={**os.environ}
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "failed", "error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_results(name: str, data: dict, header: list[str], rows: list[list], notes: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_file_atomically(RESULTS / f"{name}.json", json.dumps(data, indent=2))
    text = f"# {name}\n\n{notes}\n\n" + markdown_table(header, rows)
    write_file_atomically(RESULTS / f"{name}.md", text)
    print(text)
