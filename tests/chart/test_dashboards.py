"""The Grafana dashboards in charts/morgana/dashboards: well-formed, valid PromQL, real metrics.

Every expression (panel targets and template-variable queries) is parsed with promql_parser
after Grafana's variables are replaced by valid values, and every metric and label it names
must be exposed by the process it watches: the API (as `make run` and the tests run it, and
as the image runs it under gunicorn), the voice worker during a real call, and the controller.
"""

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

DASHBOARDS = Path(__file__).resolve().parents[2] / "charts" / "morgana" / "dashboards"
EXPECTED = {"morgana-api.json", "morgana-chat.json", "morgana-voice.json", "morgana-autoscaler.json"}
DATASOURCE_UID = "${datasource}"
# Labels Prometheus attaches to every target it scrapes in Kubernetes (ServiceMonitor/PodMonitor),
# not present in the processes' own exposition.
TARGET_LABELS = {"namespace", "job", "instance", "pod", "service", "container", "endpoint"}
# Grafana's built-in variables that stand for a duration, and a valid one for each.
DURATION_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "__range": "3h"}
BUILTIN_VARIABLES = {*DURATION_VARIABLES, "__interval_ms", "__range_s", "__range_ms", "__dashboard", "__from", "__to"}
# ${var}, ${var:format}, $var and [[var]] (Grafana's variable syntaxes).
VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$([A-Za-z_]\w*)|\[\[(\w+)(?::[^\]]*)?\]\]")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$", re.S)
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def load(name: str) -> dict:
    return json.loads((DASHBOARDS / name).read_text())


def all_panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, rows and the panels inside collapsed rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def query_panels(dashboard: dict) -> list[dict]:
    return [panel for panel in all_panels(dashboard) if panel["type"] != "row"]


def variables(dashboard: dict) -> dict[str, dict]:
    return {variable["name"]: variable for variable in dashboard.get("templating", {}).get("list", [])}


def variable_query(variable: dict) -> str:
    query = variable.get("query")
    return query.get("query", "") if isinstance(query, dict) else query or ""


def referenced_variables(text: str) -> set[str]:
    return {next(group for group in match.groups() if group) for match in VARIABLE.finditer(text)}


def substitute(text: str) -> str:
    """Grafana's variables replaced by values that keep the PromQL valid."""

    def value(match: re.Match) -> str:
        name = next(group for group in match.groups() if group)
        return DURATION_VARIABLES.get(name, "grafana-variable")

    return VARIABLE.sub(value, text)


@dataclass
class Usage:
    """What one expression asks of the exposition: metric names and the labels it relies on."""

    metrics: set[str] = field(default_factory=set)
    matcher_labels: dict[str, set[str]] = field(default_factory=dict)  # metric -> labels it matches on
    grouping: list[tuple[set[str], set[str]]] = field(default_factory=list)  # (by labels, metrics below)
    produced_labels: set[str] = field(default_factory=set)  # label_replace's destination labels
    by_labels: set[str] = field(default_factory=set)

    def merge(self, other: "Usage") -> None:
        self.metrics |= other.metrics
        for metric, labels in other.matcher_labels.items():
            self.matcher_labels.setdefault(metric, set()).update(labels)
        self.grouping += other.grouping
        self.produced_labels |= other.produced_labels
        self.by_labels |= other.by_labels


def _selector_name(node: promql_parser.VectorSelector) -> str:
    if node.name:
        return node.name
    names = [m.value for m in node.matchers.matchers if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal]
    assert names, f"selector without a metric name: {node}"
    return names[0]


def _metrics_below(expr: promql_parser.Expr) -> set[str]:
    found: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.add(_selector_name(node))

    promql_parser.walk(expr, visit)
    return found


def analyse(expr_text: str) -> Usage:
    """Parse (a SyntaxError-like ValueError fails the test) and collect what the query uses."""
    usage = Usage()
    tree = promql_parser.parse(substitute(expr_text))

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = _selector_name(node)
            usage.metrics.add(name)
            usage.matcher_labels.setdefault(name, set()).update(
                m.name for m in node.matchers.matchers if m.name != "__name__"
            )
        elif (
            isinstance(node, promql_parser.AggregateExpr)
            and node.modifier is not None
            and node.modifier.type == promql_parser.AggModifierType.By
        ):
            labels = set(node.modifier.labels)
            usage.grouping.append((labels, _metrics_below(node.expr)))
            usage.by_labels |= labels
        elif isinstance(node, promql_parser.Call) and node.func.name == "label_replace":
            usage.produced_labels.add(node.args[1].val)

    promql_parser.walk(tree, visit)
    return usage


@dataclass
class Query:
    where: str
    expr: str
    legend: str | None = None


def queries(dashboard: dict) -> list[Query]:
    """Every PromQL expression of a dashboard: panel targets and template-variable queries."""
    found = []
    for panel in query_panels(dashboard):
        for target in panel.get("targets", []):
            found.append(
                Query(
                    f"panel {panel['title']!r} target {target.get('refId')}",
                    target.get("expr", ""),
                    target.get("legendFormat"),
                )
            )
    for name, variable in variables(dashboard).items():
        if variable["type"] != "query":
            continue
        match = LABEL_VALUES.match(variable_query(variable))
        assert match, f"variable {name}: only label_values(selector, label) queries are used here"
        selector = match["selector"]
        assert selector, f"variable {name}: label_values needs a metric, or it scans every series"
        found.append(Query(f"variable {name}", selector))
    return found


def dashboard_usage(dashboard: dict) -> Usage:
    usage = Usage()
    for query in queries(dashboard):
        usage.merge(analyse(query.expr))
    for variable in variables(dashboard).values():
        if variable["type"] == "query":
            match = LABEL_VALUES.match(variable_query(variable))
            metric = _metrics_below(promql_parser.parse(substitute(match["selector"])))
            usage.grouping.append(({match["label"]}, metric))
    return usage


# --------------------------------------------------------------------------------- structure
DASHBOARD_FILES = sorted(path.name for path in DASHBOARDS.glob("*.json"))


def test_the_four_dashboards_are_there() -> None:
    assert set(DASHBOARD_FILES) == EXPECTED


def test_uids_and_titles_are_unique() -> None:
    boards = [load(name) for name in DASHBOARD_FILES]
    uids = [board["uid"] for board in boards]
    titles = [board["title"] for board in boards]
    assert len(set(uids)) == len(uids), uids
    assert len(set(titles)) == len(titles), titles


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_dashboard_model(name: str) -> None:
    board = load(name)
    assert board["schemaVersion"] >= 39
    assert re.fullmatch(r"[a-z0-9-]{1,40}", board["uid"]), board["uid"]  # Grafana: at most 40 characters
    assert board["uid"] == Path(name).stem
    assert board["title"].startswith("Morgana / ")
    assert "morgana" in board["tags"]
    assert board.get("id") is None, "a provisioned dashboard must not carry a database id"
    assert board["time"]["from"] and board["refresh"]

    declared = variables(board)
    datasource = declared.get("datasource")
    assert datasource and datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    for variable_name, variable in declared.items():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == DATASOURCE_UID, variable_name
            assert variable.get("refresh") in (1, 2), f"{variable_name} must refresh on load or time change"

    panels = query_panels(board)
    rows = [panel for panel in all_panels(board) if panel["type"] == "row"]
    assert rows, "panels are grouped in rows"
    ids = [panel["id"] for panel in all_panels(board)]
    assert len(set(ids)) == len(ids), "panel ids are unique"
    for panel in panels:
        where = f"{name}: panel {panel.get('title')!r}"
        assert panel["type"] in {"timeseries", "stat"}, where
        assert panel.get("title") and panel.get("description"), where
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, where
        targets = panel.get("targets")
        assert targets, where
        ref_ids = [target.get("refId") for target in targets]
        assert all(ref_ids) and len(set(ref_ids)) == len(ref_ids), where
        for target in targets:
            assert target.get("expr", "").strip(), f"{where} target {target.get('refId')}"
            assert target.get("datasource", {"uid": DATASOURCE_UID})["uid"] == DATASOURCE_UID, where
        unit = panel["fieldConfig"]["defaults"].get("unit")
        assert unit, f"{where}: no unit"
        if panel["type"] == "timeseries":
            legend = panel["options"]["legend"]
            assert legend["showLegend"] and legend["displayMode"] in {"table", "list"}, where
            for target in targets:
                assert target.get("legendFormat") not in (None, "", "__auto"), (
                    f"{where} target {target['refId']}: name the series"
                )


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_panels_fit_the_grid_without_overlapping(name: str) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in load(name)["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_every_expression_is_valid_promql_with_defined_variables(name: str) -> None:
    board = load(name)
    defined = set(variables(board)) | BUILTIN_VARIABLES
    for query in queries(board):
        assert not referenced_variables(query.expr) - defined, f"{name} {query.where}: undefined variable"
        try:
            usage = analyse(query.expr)
        except Exception as exc:  # promql_parser raises ValueError/SyntaxError flavours
            raise AssertionError(f"{name} {query.where}: invalid PromQL: {exc}\n{query.expr}") from exc
        assert usage.metrics, f"{name} {query.where}: names no metric"
        if query.legend and not query.where.startswith("variable"):
            # Legend placeholders must be labels the query keeps.
            kept = usage.by_labels | usage.produced_labels
            assert set(LEGEND_LABEL.findall(query.legend)) <= kept, f"{name} {query.where}: {query.legend}"
        for metric in usage.metrics:
            assert not metric.endswith("_created"), f"{name} {query.where}: {metric}"


def test_variable_substitution_and_metric_collection() -> None:
    """The helpers themselves: variables become valid PromQL and nested selectors are all found."""
    usage = analyse(
        'histogram_quantile(0.9, sum by (le, handler) (rate(a_bucket{job=~"$job", x="${x:regex}"}'
        '[$__rate_interval]))) / on() group_left sum(increase(b_total{y="[[y]]"}[$__range]))'
        ' or label_replace(vector(0), "code", "llm_$1", "reason", "(.*)")'
    )
    assert usage.metrics == {"a_bucket", "b_total"}
    assert usage.matcher_labels["a_bucket"] == {"job", "x"}
    assert usage.by_labels == {"le", "handler"}
    assert usage.produced_labels == {"code"}
    assert referenced_variables('rate(x{a=~"$a", b="${b:pipe}"}[$__rate_interval]) [[c]] $1') == {
        "a",
        "b",
        "__rate_interval",
        "c",
    }
    with pytest.raises(ValueError):
        analyse("sum(rate(x_total[5m])")


# --------------------------------------------------------------------- against real processes
def exposed(*texts: str) -> dict[str, set[str] | None]:
    """Exposed sample names -> their label names (None: a family declared without samples yet)."""
    names: dict[str, set[str] | None] = {}
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "summary": ["_sum", "_count"],
        "gauge": [""],
    }
    for text in texts:
        for family in text_string_to_metric_families(text):
            for suffix in suffixes.get(family.type, []):
                names.setdefault(family.name + suffix, None)
            for sample in family.samples:
                names[sample.name] = (names.get(sample.name) or set()) | set(sample.labels)
    return names


def assert_dashboard_uses_only(name: str, exposition: dict[str, set[str] | None], source: str) -> set[str]:
    """The dashboard's metrics are all exposed, and so are the labels it matches and groups on.

    Returns the metrics whose labels could be checked (those with samples in `source`).
    """
    usage = dashboard_usage(load(name))
    missing = sorted(usage.metrics - set(exposition))
    assert not missing, f"{name} uses metrics {source} does not expose: {missing}"
    sampled = {metric for metric in usage.metrics if exposition[metric] is not None}
    for metric, labels in usage.matcher_labels.items():
        if metric in sampled:
            unknown = labels - exposition[metric] - TARGET_LABELS
            assert not unknown, f"{name}: {metric} has no label(s) {sorted(unknown)} in {source}"
    for by, metrics in usage.grouping:
        if metrics <= sampled:
            available = set().union(*(exposition[m] for m in metrics)) | TARGET_LABELS
            unknown = by - available
            assert not unknown, f"{name}: grouping by {sorted(unknown)}, absent from {sorted(metrics)} in {source}"
    return sampled


# The API's metrics as the tests and `make run` serve them (one uvicorn process) and as the
# image serves them (gunicorn workers summed through PROMETHEUS_MULTIPROC_DIR): both must do.
SOURCES = {
    "morgana-api.json": ["api_metrics_text", "api_gunicorn_metrics_text"],
    "morgana-chat.json": ["api_metrics_text", "api_gunicorn_metrics_text"],
    "morgana-voice.json": ["agent_metrics_text"],
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_dashboard_names_only_metrics_the_processes_expose(name: str, request: pytest.FixtureRequest) -> None:
    label_checked: set[str] = set()
    for fixture in SOURCES[name]:
        label_checked |= assert_dashboard_uses_only(name, exposed(request.getfixturevalue(fixture)), fixture)
    # The traffic gave every metric a sample somewhere, so all its labels were checked.
    assert dashboard_usage(load(name)).metrics == label_checked


def test_autoscaler_dashboard_names_controller_metrics(controller_metrics_text: str) -> None:
    used = assert_dashboard_uses_only("morgana-autoscaler.json", exposed(controller_metrics_text), "the controller")
    assert used == dashboard_usage(load("morgana-autoscaler.json")).metrics
    # Every metric the controller declares has a panel.
    declared = {
        family.name
        for family in text_string_to_metric_families(controller_metrics_text)
        if family.name.startswith("morgana_controller_") and not family.name.endswith("_created")
    }
    shown = {re.sub(r"_(bucket|sum|count|total)$", "", metric) for metric in used}
    assert declared and declared <= shown, sorted(declared - shown)
