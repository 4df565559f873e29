"""What the benchmarks share: percentiles, ratios, result lines and tables, and the machine they ran on."""

import contextlib
import json
import math
import platform
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


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


def ratio(x: float | None, y: float | None) -> float | None:
    if x is None or y is None or not math.isfinite(x) or not math.isfinite(y) or y == 0:
        return None
    return x / y


def rounded(value: float | None, digits: int = 3) -> float | int | None:
    if value is None or isinstance(value, int):
        return value
    return None if not math.isfinite(value) else round(value, digits)


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
    """Result records: each printed as a JSON line at once, all written to a file at the end."""

    def __init__(self) -> None:
        self.lines: list[dict] = []

    def emit(self, record: dict) -> None:
        self.lines.append(record)
        print(json.dumps(record), flush=True)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(line) + "\n" for line in self.lines))


def start_services(stack: contextlib.ExitStack, workdir: Path, model_key: str) -> tuple:
    """A real Postgres and Valkey and the local model server, stopped when `stack` closes:
    (EmbeddedPostgres, EmbeddedValkey, FakeOpenAIProcess)."""
    from morgana.devtools.openai_server import FakeOpenAIProcess
    from morgana.devtools.services import EmbeddedPostgres, EmbeddedValkey

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
