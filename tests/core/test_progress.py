"""The status line names each end state apart, so cancelled trials never read as failures."""

from orchestrator.progress import status_line


def test_status_line_counts_cancelled_and_timeout_apart_from_failed() -> None:
    line = status_line({"done": 1, "failed": 2, "cancelled": 3, "timeout": 4, "queued": 5}, 12, None)
    assert line.startswith("done 1 | running 0 | failed 2 | timeout 4 | cancelled 3 | queued 5 | elapsed 00:12")


def test_status_line_leaves_out_end_states_that_did_not_happen() -> None:
    line = status_line({"done": 3}, 0, 0)
    assert line == "done 3 | running 0 | failed 0 | queued 0 | elapsed 00:00 | eta 00:00"
