"""Terminal rendering of a comparison (rich tables)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from orchestrator.report.compare import Comparison, Difference
from orchestrator.report.summary import format_value


def _side(mean: float, std: float, n: int) -> str:
    return format_value(mean) + (f" ± {format_value(std)}" if n > 1 and std == std and mean == mean else "")


def _verdict(diff: Difference) -> str:
    if diff.regressed:
        return "[red]regressed[/red]"
    if diff.improved:
        return "[green]improved[/green]"
    return "~"


def print_comparison(result: Comparison, name_a: str, name_b: str, threshold: float) -> None:
    """One table per summary table: A, B, relative change, beyond the repeats' spread, verdict."""
    console = Console(width=220)
    console.print(f"[bold]{name_b}[/bold] against [bold]{name_a}[/bold] on {len({str(d.config) for d in result.differences})} "
                  f"shared configuration(s) of {', '.join(result.keys) or '(no axes)'}; regression threshold {threshold:.0%}")
    if result.only_a or result.only_b:
        console.print(f"not compared: {result.only_a} configuration(s) only in {name_a}, {result.only_b} only in {name_b}")
    for key, (value_a, value_b) in result.base_differences.items():
        console.print(f"base parameter differs: {key}: {value_a} -> {value_b}")
    for table_name in dict.fromkeys(d.table for d in result.differences):
        table = Table(title=table_name)
        for column in (*result.keys, "metric", name_a, name_b, "change", "beyond spread", "verdict"):
            table.add_column(column, justify="left" if column in (*result.keys, "metric", "verdict") else "right")
        for diff in (d for d in result.differences if d.table == table_name):
            change = f"{diff.relative:+.1%}" if diff.relative == diff.relative else "-"
            spread = "-" if diff.beyond_spread is None else ("yes" if diff.beyond_spread else "no")
            table.add_row(*(format_value(diff.config[k]) for k in result.keys), diff.metric, _side(diff.a_mean, diff.a_std, diff.a_n),
                          _side(diff.b_mean, diff.b_std, diff.b_n), change, spread, _verdict(diff))
        console.print(table)
