"""EBFT's run-folder report: the per-block table (Markdown) and loss curves (PNG bytes, drawn without a display)."""

from __future__ import annotations

import io

from sparsefit.text import markdown_table


def ebft_markdown(blocks: list[dict], config: dict) -> str:
    """The per-block EBFT table: reconstruction loss before/after, held-out loss, the rate kept, time, tokens/s."""
    rows = []
    for b in blocks:
        reduction = 1 - b["final_loss"] / b["initial_loss"] if b["initial_loss"] else None
        window = b.get("window")
        name = f"{window[0]}-{window[1]}" if window else b["block"]
        kept = "kept as pruned" if b.get("reverted") else f"{b.get('lr', 0):.3g}" + (
            f" ({b['attempts']} fits)" if b.get("attempts", 1) > 1 else "")  # fmt: skip
        rows.append([
            name, b["initial_loss"], b["final_loss"], reduction, b.get("initial_heldout"), b.get("final_heldout"),
            kept, b["epochs_run"], b["steps"], round(b["time_s"], 2), round(b["tokens_per_s"]),
        ])  # fmt: skip
    settings = ", ".join(f"{k} {v}" for k, v in config.items())
    total = sum(b["time_s"] for b in blocks)
    backed_off = [str(b["block"]) for b in blocks if b.get("attempts", 1) > 1 and not b.get("reverted")]
    reverted = [str(b["block"]) for b in blocks if b.get("reverted")]
    robust = ""
    if backed_off:
        robust += (f"Block(s) {', '.join(backed_off)}: the first fit did not improve on the start and was redone at a "
                   "lower rate. ")  # fmt: skip
    if reverted:
        robust += f"Block(s) {', '.join(reverted)}: no fit improved on the start; kept as pruned. "
    return (
        "# EBFT per-block reconstruction\n\n"
        f"Settings: {settings}. Fine-tuning time {total:.1f} s over {len(blocks)} fits. "
        "No fit ends worse than it began: each ends on its best held-out state, the start included (without "
        "held-out windows: back to the start when its training loss rose).\n\n"
        + (robust.strip() + "\n\n" if robust else "")
        + markdown_table(
            ["block", "initial MSE", "final MSE", "reduction", "held-out before", "held-out after", "lr kept",
             "epochs", "steps", "time s", "tokens/s"],
            rows,
        )  # fmt: skip
    )


def ebft_plot_png(blocks: list[dict]) -> bytes:
    """Two panels: each block's training-loss curve over epochs, and the error reduction per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("viridis")
    for i, b in enumerate(blocks):
        points = [b["initial_loss"], *b["train_curve"]]
        curves.plot(range(len(points)), points, color=cmap(i / max(len(blocks) - 1, 1)), lw=1)
    curves.set_yscale("log")
    curves.set_xlabel("epoch (0 = before fine-tuning)")
    curves.set_ylabel("reconstruction MSE")
    curves.set_title("per-block training loss (dark = early blocks)")
    reduction = [100 * (1 - b["final_loss"] / b["initial_loss"]) if b["initial_loss"] else 0 for b in blocks]
    bars.bar([b["block"] for b in blocks], reduction, color="tab:blue")
    bars.set_xlabel("block")
    bars.set_ylabel("error reduction (%)")
    bars.set_title("reconstruction error removed by EBFT")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
