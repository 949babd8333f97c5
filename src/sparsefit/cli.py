"""The command line: parses, validates, calls the library, shows progress. Nothing runs at import."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from sparsefit.errors import UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prune Hugging Face causal LMs and recover their quality, block by block.",
)


def _echo_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    from rich.table import Table

    from sparsefit.progress import console

    table = Table(title=title)
    for name in header:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UsageError(f"output folder {str(out)!r} exists and is not empty; pass --overwrite or choose another")


@app.command()
def prune(
    model: str = typer.Option("smollm2-135m", help="built-in name, local folder, .gguf file or hub id"),
    method: str = typer.Option("wanda", help="magnitude, wanda or sparsegpt"),
    sparsity: float = typer.Option(0.5, help="fraction of weights to remove, in [0, 1)"),
    pattern: str = typer.Option("unstructured", help="unstructured or N:M (e.g. 2:4)"),
    calib: str = typer.Option("wiki", help="calibration corpus: wiki, books, a .txt/.jsonl file or folder"),
    nsamples: int = typer.Option(128, help="calibration windows"),
    seqlen: int = typer.Option(512, help="tokens per calibration window"),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(8, help="windows per forward pass"),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 (bf16 is very slow on CPU)"),
    sparsegpt_update: bool = typer.Option(True, help="SparseGPT: apply the OBS weight update (else masks only)"),
    eval_ppl: str = typer.Option("", help="after pruning, perplexity on these corpora (e.g. wiki,books)"),
    eval_seqlen: int = typer.Option(1024),
    eval_max_tokens: int = typer.Option(None, help="evaluate only the first N test tokens"),
    out: Path = typer.Option(..., help="output run folder"),
    overwrite: bool = typer.Option(False, help="replace a non-empty output folder"),
    trust_remote_code: bool = typer.Option(False),
) -> None:
    """Prune a model and write a run folder (safetensors with exact zeros, sparsity.json, run.json)."""
    from sparsefit.pipeline.jobs import run_prune
    from sparsefit.pipeline.prune_model import PruneConfig

    config = PruneConfig(
        method=method, sparsity=sparsity, pattern=pattern, calib=calib, nsamples=nsamples, seqlen=seqlen,
        seed=seed, batch_size=batch_size, device=device, sparsegpt_update=sparsegpt_update,
    )  # fmt: skip
    config.validate()
    _check_out(out, overwrite)
    run = run_prune(
        model,
        config,
        out,
        dtype=dtype,
        overwrite=overwrite,
        eval_ppl=eval_ppl,
        eval_seqlen=eval_seqlen,
        eval_max_tokens=eval_max_tokens,
        trust_remote_code=trust_remote_code,
    )
    typer.echo(f"wrote {out} (sparsity {run['results']['sparsity']:.4f}, {run['timings']['prune_s']:.1f} s)")


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="run folder, local folder, built-in name, .gguf file or hub id"),
    ppl: str = typer.Option("wiki,books", help="corpora for perplexity (comma-separated; empty for none)"),
    seqlen: int = typer.Option(1024, help="tokens per perplexity window"),
    max_tokens: int = typer.Option(None, help="evaluate only the first N test tokens"),
    tasks: str = typer.Option("", help="zero-shot tasks, e.g. arc_easy,piqa"),
    limit: int = typer.Option(None, help="zero-shot: first N documents per task"),
    device: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
) -> None:
    """Perplexity (WikiText-2 protocol, seqlen printed with every number) and zero-shot accuracy."""
    from sparsefit.models import load
    from sparsefit.pipeline.jobs import evaluate_model, parse_list
    from sparsefit.pipeline.prune_model import resolve_device
    from sparsefit.progress import bar

    if limit is not None and limit <= 0:
        raise UsageError(f"--limit {limit} must be a positive number of documents")
    device_ = resolve_device(device)
    loaded = load(model)
    results = evaluate_model(
        loaded.model,
        loaded.tokenizer,
        ppl=parse_list(ppl),
        seqlen=seqlen,
        max_tokens=max_tokens,
        tasks=parse_list(tasks),
        limit=limit,
        device=device_,
        bar=bar,
    )
    if as_json:
        typer.echo(json.dumps(results))
        return
    rows = [
        [f"ppl {name}", f"{r['value']:.3f}", f"seqlen {r['seqlen']}, {r['tokens']} tokens"]
        for name, r in results.get("ppl", {}).items()
    ]
    rows += [
        [task, " / ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "n"), f"n {r['n']}"]
        for task, r in results.get("tasks", {}).items()
    ]
    _echo_table(f"evaluation of {model}", ["metric", "value", "on"], rows)


@app.command()
def info(run_dir: Path = typer.Argument(..., help="a run folder or checkpoint folder")) -> None:
    """Sparsity per layer and the N:M pattern check."""
    from sparsefit.models import load
    from sparsefit.pipeline.jobs import sparsity_summary

    pattern = "unstructured"
    sparsity_file = run_dir / "sparsity.json"
    if sparsity_file.exists():
        pattern = json.loads(sparsity_file.read_text()).get("pattern", pattern)
    loaded = load(str(run_dir))
    report = sparsity_summary(loaded.model, pattern)
    rows = [
        [name, "x".join(map(str, r["shape"])), f"{r['sparsity']:.4f}"] for name, r in report["layers"].items()
    ]
    _echo_table(f"{run_dir}: overall sparsity {report['overall']:.4f}", ["layer", "shape", "sparsity"], rows)
    if "pattern_ok" in report:
        typer.echo(f"pattern {pattern}: {'holds in every layer' if report['pattern_ok'] else 'VIOLATED'}")


def main() -> None:
    """Entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except UsageError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click's own usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(2)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
