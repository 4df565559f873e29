"""The voice benchmark's result lines (`Results`: printed at once, tagged with the configuration being
measured, tabulated at the end) and the closing report: every line, the configurations side by side,
the capacity levels and the worker's memory."""

from __future__ import annotations

import time
from collections.abc import Sequence

from bench.common import REPO, RESULTS_DIR, ResultLines, cell, render_table
from bench.voice_settings import BENCH_CORE, STAGES, WORKER_CORE, WorkerConfig

RESULTS = RESULTS_DIR / "voice.jsonl"


class Results(ResultLines):
    """Collects result lines: printed at once (stdout), written and tabulated at the end.

    `add(bench, metric, value, baseline, unit, **extra)`: ratio = value / baseline. While
    `config` is set, every line emitted gets `"config": config` (unless it names its own).
    """

    columns = ("value", "baseline")
    lead = ("config",)

    def __init__(self) -> None:
        super().__init__()
        self.config: str | None = None

    def emit(self, record: dict) -> None:
        if self.config is not None and "config" not in record:
            record = {"bench": record["bench"], "config": self.config, **record}
        super().emit(record)

    def find(self, config: str, bench: str, metric: str) -> dict | None:
        """The line of `config` with this bench and metric (the last one), if any."""
        found = None
        for line in self.lines:
            if line.get("config") == config and line.get("bench") == bench and line.get("metric") == metric:
                found = line
        return found

    def value(self, config: str, bench: str, metric: str) -> float | None:
        line = self.find(config, bench, metric)
        return None if line is None else line.get("value")

    def tabulated(self, line: dict) -> bool:
        return "metric" in line and not (line["bench"] == "capacity" and "calls" in line)

    def note(self, line: dict) -> str:
        note = line.get("note", "")
        if "overhead_ms" in line:
            note = f"overhead {cell(line['overhead_ms'])} ms" + (f"; {note}" if note else "")
        return note

    def levels(self) -> list[dict]:
        """The capacity level lines, in the order measured."""
        return [line for line in self.lines if line.get("bench") == "capacity" and "calls" in line]

    def config_table(self, configs: Sequence[WorkerConfig]) -> str:
        """One row per configuration: its settings, its one-call latency over its own endpointing
        delay, the worker's CPU in that call, the configuration it is compared with, and the issue's
        targets."""
        rows = [
            (
                "config",
                "detector",
                "vad ms",
                "endpointing ms",
                "preemptive",
                "provider ms",
                "turns",
                "missed",
                "overlap",
                "p50 ms",
                "p95 ms",
                "p50 over ms",
                "p95 over ms",
                "worker cpu %",
                "p50 vs",
                "target ms",
                "pass",
            )
        ]
        for config in configs:
            p50 = self.find(config.name, "voice_turn", "latency_p50") or {}
            p95 = self.find(config.name, "voice_turn", "latency_p95") or {}
            checks = [
                line["pass"] for line in self.lines if line.get("config") == config.name and line["bench"] == "target"
            ]
            versus = self.find(config.name, "compare", f"latency_p50_vs_{config.compare_with}")
            rows.append(
                (
                    config.name,
                    config.turn_detector,
                    f"{1000 * config.vad_min_silence:.0f}",
                    f"{1000 * config.endpointing_delay:.0f}",
                    "yes" if config.preemptive else "no",
                    "/".join(f"{v:.0f}" for v in config.provider_delays_ms.values()) or "0",
                    cell(p50.get("n")),
                    cell(p50.get("missed")),
                    cell(p50.get("overlapped")),
                    cell(p50.get("value")),
                    cell(p95.get("value")),
                    cell(p50.get("overhead_ms")),
                    cell(p95.get("overhead_ms")),
                    cell(self.value(config.name, "voice_turn", "worker_cpu")),
                    f"{cell(versus['ratio'])} x {config.compare_with}" if versus else "-",
                    config.targets.text(),
                    ("yes" if all(checks) else "NO") if checks else "-",
                )
            )
        return render_table(rows, left=(0, 1, 5, 14, 15))

    def capacity_table(self) -> str:
        rows = [
            (
                "calls",
                "turns",
                "missed",
                "overlap",
                "gaps",
                "p50 ms",
                "p95 ms",
                "max ms",
                "pass",
                "worker cpu %",
                "cpu/call %",
                "core0 %",
                "core1 %",
                "core1 other %",
                "eot ms",
                "api ms",
                "tts ms",
                "e2e ms",
                "api direct ms",
                "vad slow",
                "loop lag p99 ms",
            )
        ]
        for line in self.levels():
            stages = line.get("stages", {})
            rows.append(
                (
                    str(line["calls"]),
                    str(line["turns"]),
                    str(line["missed"]),
                    str(line["overlapped"]),
                    str(line.get("underruns", "-")),
                    cell(line["p50_ms"]),
                    cell(line["p95_ms"]),
                    cell(line["max_ms"]),
                    "yes" if line["pass"] else "NO",
                    cell(line["worker_cpu_pct_of_core"]),
                    cell(line["worker_cpu_pct_per_call"]),
                    cell(line["core_util_pct"].get(f"cpu{BENCH_CORE}")),
                    cell(line["core_util_pct"].get(f"cpu{WORKER_CORE}")),
                    cell(line["worker_core_others_pct"]),
                    *(cell(stages.get(label, {}).get("mean_ms")) for _, label in STAGES),
                    cell(line["api_probe_ttfe"]["p50_ms"]),
                    str(line["agent_warnings"]["vad_slower_than_realtime"]),
                    cell(line["bench_loop_lag_p99_ms"]),
                )
            )
        return render_table(rows, left=())

    def memory_table(self) -> str:
        """The worker's process tree idle (every configuration) and at each capacity level."""
        rows = [("config", "calls", "rss MiB", "pss MiB", "+rss/call MiB", "+pss/call MiB", "pss MiB by process")]
        for line in self.lines:
            if "worker_memory" not in line:  # only the idle worker's line and the capacity levels' have it
                continue
            memory = line["worker_memory"]
            rows.append(
                (
                    line["config"],
                    str(line.get("calls", 0)),
                    cell(memory["rss_mib"]),
                    cell(memory["pss_mib"]),
                    cell(memory.get("per_call_rss_mib")),
                    cell(memory.get("per_call_pss_mib")),
                    by_process(memory["processes"]),
                )
            )
        return render_table(rows, left=(0, 6))


def by_process(processes: list[dict]) -> str:
    """`main 150, forkserver 60, 4 job 44-61`: PSS (MiB) per process role, RSS where PSS was unreadable."""
    key = "pss_mib" if all(p["pss_mib"] is not None for p in processes) else "rss_mib"
    roles: dict[str, list[float]] = {}
    for process in processes:
        roles.setdefault(process["role"], []).append(process[key])
    parts = []
    for role, values in roles.items():
        low, high = f"{min(values):.0f}", f"{max(values):.0f}"
        span = low if low == high else f"{low}-{high}"
        parts.append(f"{role} {span}" if len(values) == 1 else f"{len(values)} {role} {span}")
    return ", ".join(parts) + ("" if key == "pss_mib" else " (RSS)")


def print_report(res: Results, began: float, configs: Sequence[WorkerConfig]) -> None:
    """The tables, unexpected replies and log errors, and where the results are."""
    tables = [res.table(), res.config_table(configs), res.capacity_table() if res.levels() else "", res.memory_table()]
    for table in filter(None, tables):
        print(f"\n{table}", flush=True)
    for line in res.lines:
        if line.get("unexpected_replies"):
            print(
                f"  {line['config']} {line['metric']}: unexpected agent replies {line['unexpected_replies']}",
                flush=True,
            )
        if line.get("log_error_lines"):
            who = " ".join(filter(None, (line.get("config"), line["log"])))
            print(
                f"  {who} log: {line['log_error_lines']} error lines, first: {line['log_sample'][0][:200]}",
                flush=True,
            )
    print(
        f"\n(results in {RESULTS.relative_to(REPO)}; total {time.monotonic() - began:.0f} s; "
        f"worker on core {WORKER_CORE}, callers and services on core {BENCH_CORE}; "
        "baseline = each configuration's MIN_ENDPOINTING_DELAY; capacity and api_chat: `default`)",
        flush=True,
    )
