"""What `orch report` and `orch compare` make of an experiment's Parquet dataset.

- ``summary``: summary tables aggregated over repeats (the terminal tables);
- ``data``: an experiment's finished trials joined with their grid axes;
- ``figures``: the registry of plots, each drawn only when its axes vary in the data;
- ``page``: the self-contained HTML page and the Markdown variant;
- ``compare``: differences between two experiments on their shared configurations.
"""

from orchestrator.report.summary import SummaryReport, format_value, state_counts, summarize

__all__ = ["SummaryReport", "format_value", "state_counts", "summarize"]
