"""What the benchmarks share: percentiles, ratios, result lines and tables, the machine they ran on, and the
services and scratch space they start."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from morgana_devtools.openai_server import FakeOpenAIProcess
    from morgana_devtools.services import EmbeddedPostgres, EmbeddedValkey

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench-results"
MODEL = "morgana-bench-model"  # the model name the API (and the API benchmark's baseline) asks for
RATE = "1000000/minute"  # every API rate limit: the benchmarks measure the API, not its limits
CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def logger(prefix: str) -> Callable[[str], None]:
    """A progress log on stderr: `[prefix HH:MM:SS] message`."""

    def log(message: str) -> None:
        print(f"[{prefix} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return log


def interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, so a terminated run stops its processes like Ctrl-C does."""

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total_mib() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info(*, implementation: bool = False) -> dict:
    """The machine and Python a run is on, for the first result line."""
    info: dict = {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "mem_total_mib": mem_total_mib(),
        "loadavg": load_average(),
        "python": platform.python_version(),
    }
    if implementation:
        info["implementation"] = platform.python_implementation()
    info["platform"] = platform.platform()
    info["started"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return info


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process and its live descendants so far (a gunicorn master and
    its workers: the master's own figure leaves the workers out)."""
    import psutil

    total = cpu_seconds(pid)
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += cpu_seconds(child.pid)
    return total


def machine_busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as stat:
        numbers = [int(v) for v in stat.readline().split()[1:9]]
    return sum(numbers) - numbers[3] - numbers[4], sum(numbers)


def ratio(x: float | None, y: float | None) -> float | None:
    if x is None or y is None or not math.isfinite(x) or not math.isfinite(y) or y == 0:
        return None
    return x / y


def rounded(value: float | None, digits: int = 3) -> float | int | None:
    if value is None or isinstance(value, int):
        return value
    return None if not math.isfinite(value) else round(value, digits)


def ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds; None for no (or a non-finite) value."""
    return None if seconds is None or not math.isfinite(seconds) else 1000 * seconds


def cell(value: object) -> str:
    """A table cell: '-' for no value, floats to a readable precision."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def render_table(rows: list[tuple[str, ...]], left: tuple[int, ...] = ()) -> str:
    """Aligned columns (the `left` ones left-aligned), a rule under the header row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for index, row in enumerate(rows):
        out.append(
            "  ".join(
                text.ljust(w) if i in left else text.rjust(w)
                for i, (text, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


class ResultLines:
    """Result records: each printed as a JSON line at once, all written to a file at the end.

    `add` records a figure beside the one it is compared with (`columns` names the two keys) and
    their ratio; `table` tabulates those records.
    """

    columns: tuple[str, str] = ("value", "baseline")  # ratio = first / second
    headers: tuple[str, str] | None = None  # the two columns' table headers (default: `columns`)
    notes = True  # a note column in the table
    lead: tuple[str, ...] = ()  # keys shown in columns of their own before `bench` (e.g. a configuration)

    def __init__(self) -> None:
        self.lines: list[dict] = []

    def emit(self, record: dict) -> None:
        self.lines.append(record)
        print(json.dumps(record), flush=True)

    def add(
        self, bench: str, metric: str, value: float | None, other: float | None, unit: str, **extra: object
    ) -> None:
        first, second = self.columns
        record = {
            "bench": bench,
            "metric": metric,
            first: rounded(value),
            second: rounded(other),
            "ratio": rounded(ratio(value, other)),
            "unit": unit,
        }
        record.update({k: v for k, v in extra.items() if v is not None})
        self.emit(record)

    def tabulated(self, line: dict) -> bool:
        """Whether a result line is a row of `table` (the ones `add` wrote)."""
        return "metric" in line

    def note(self, line: dict) -> str:
        return line.get("note", "")

    def table(self) -> str:
        first, second = self.columns
        header = (*self.lead, "bench", "metric", *(self.headers or self.columns), "ratio", "unit")
        rows = [header + (("note",) if self.notes else ())]
        for line in self.lines:
            if not self.tabulated(line):
                continue
            row = (
                *(cell(line.get(key)) for key in self.lead),
                line["bench"],
                line["metric"],
                cell(line[first]),
                cell(line[second]),
                cell(line["ratio"]),
                line["unit"],
            )
            rows.append(row + ((self.note(line),) if self.notes else ()))
        n = len(self.lead)
        left = (*range(n), n, n + 1, n + 5, *((n + 6,) if self.notes else ()))
        return render_table(rows, left=left)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(line) + "\n" for line in self.lines))


def scratch_dir(
    stack: contextlib.ExitStack, prefix: str, keep_env: str | None = None, log: Callable[[str], None] | None = None
) -> Path:
    """A temporary directory for logs and data, removed when `stack` closes (kept, and said so,
    when the environment variable `keep_env` is set)."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    if keep_env and os.environ.get(keep_env):
        stack.callback(log or print, f"logs kept in {workdir}")
    else:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    return workdir


def start_services(stack: contextlib.ExitStack, workdir: Path, model_key: str) -> tuple:
    """A real Postgres and Valkey and the local model server, stopped when `stack` closes:
    (EmbeddedPostgres, EmbeddedValkey, FakeOpenAIProcess)."""
    from morgana_devtools.openai_server import FakeOpenAIProcess
    from morgana_devtools.services import EmbeddedPostgres, EmbeddedValkey

    pg = EmbeddedPostgres(workdir / "pg", delete_on_stop=True)
    stack.callback(pg.stop)
    pg.start()
    valkey = EmbeddedValkey()
    stack.callback(valkey.stop)
    valkey.start()
    fake = FakeOpenAIProcess(api_key=model_key)
    stack.callback(fake.stop)
    fake.start()
    return pg, valkey, fake


def morgana_env(
    pg: EmbeddedPostgres, valkey: EmbeddedValkey, fake: FakeOpenAIProcess, model_key: str
) -> dict[str, str]:
    """The API's environment for a benchmark: test mode, quiet logs, no model retries, no tracing,
    rate limits out of the way."""
    from morgana.api.ratelimit import LIMIT_NAMES

    env = {
        "ENVIRONMENT": "test",
        "LOG_LEVEL": "WARNING",
        "DATABASE_URL": pg.url(),
        "REDIS_URL": valkey.url,
        "JWT_SECRET_KEY": secrets.token_hex(32),
        "OPENAI_API_KEY": model_key,
        "OPENAI_BASE_URL": fake.base_url,
        "LLM_MODEL": MODEL,
        "LLM_TIMEOUT_SECONDS": "30",
        "LLM_MAX_RETRIES": "0",  # a failure must show up as an error, not a silent retry
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",  # tracing off
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for name in LIMIT_NAMES:
        env[f"RATE_LIMIT_{name.upper()}"] = RATE
    return env


def log_problems(path: Path, *also: str) -> list[str]:
    """The lines of a service's log that report an error (ERROR or CRITICAL level, a traceback, or
    any of `also`)."""
    needles = ('"level": "ERROR"', '"level": "CRITICAL"', "Traceback", *also)
    with contextlib.suppress(FileNotFoundError):
        return [line for line in path.read_text(errors="replace").splitlines() if any(n in line for n in needles)]
    return []
