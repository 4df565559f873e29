"""The API benchmark's report: result lines of Morgana beside the baseline, and the closing summary."""

from __future__ import annotations

import json
import time

from bench.common import REPO, RESULTS_DIR, ResultLines

RESULTS = RESULTS_DIR / "api.jsonl"


class Results(ResultLines):
    """Collects result lines: printed at once (stdout), written and tabulated at the end.

    `add(bench, metric, morgana, baseline, unit, **extra)`: ratio = morgana / baseline.
    """

    columns = ("morgana", "baseline")
    notes = False


def print_report(res: Results, began: float) -> None:
    """The table, the problems any line reported, and where the results are."""
    print(flush=True)
    print(res.table(), flush=True)
    for line in res.lines:
        if line.get("problems"):
            print(f"  {line['bench']}/{line['metric']}: {json.dumps(line['problems'])}", flush=True)
        if line.get("api_log_error_lines"):
            print(
                f"  API log: {line['api_log_error_lines']} error lines, first: {line['api_log_sample'][0][:200]}",
                flush=True,
            )
    print(
        f"\n(results in {RESULTS.relative_to(REPO)}; total {time.monotonic() - began:.0f} s; "
        "ratio = morgana / baseline)",
        flush=True,
    )
