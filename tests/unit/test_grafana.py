"""The Grafana dashboard (deploy/grafana/orchestrator.json) queries only what the collector exports.

The exported series and their label names come from the real MonitorCollector: a Monitor is fed a worker's
reports, a stall, shared-memory counters and a GPU so that every family has samples, and the exposition text
from prometheus_client is parsed back. `check_dashboard` then reads every PromQL expression of the dashboard
(panel targets and template-variable queries) and reports, by name, any metric that is not an exported
series (a typo, a missing or wrong suffix such as a bare counter or histogram name), any label that is not on
the metric it is used with (selectors, `by`/`without`, `on`/`ignoring`/`group_*`, legends, label_values),
rate()/increase() over a gauge, and histogram_quantile over anything but `_bucket` series or without `le`.
"""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.common.config import Config
from orchestrator.supervisor.monitor.metrics import make_registry
from orchestrator.supervisor.monitor.monitor import Monitor
from tests.unit.monitor_data import batch, driver_lock_stall
from workers.driver_journal import DriverJournal
from workers.telemetry import WorkerTelemetry

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "orchestrator.json"

#: Labels Prometheus attaches to every scraped series (target labels); the collector never sets them.
TARGET_LABELS = frozenset({"instance", "job"})
#: Suffixes a family's samples carry in the exposition.
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")
#: Grafana's built-in interval variables, replaced by a duration before the expression is read.
_GRAFANA_DURATIONS = re.compile(r"\$\{?__(?:rate_interval|interval|range)(?:_ms|_s)?\}?")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT = re.compile(r"(?<![\w:.])[A-Za-z_:][\w:]*")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_MODIFIER = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")
_VARIABLE = re.compile(r"\$\{?([A-Za-z_]\w*)")
AGGREGATIONS = frozenset(
    {
        "sum",
        "avg",
        "min",
        "max",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "limitk",
        "limit_ratio",
    }
)
COUNTER_FUNCTIONS = frozenset({"rate", "irate", "increase"})
FUNCTIONS = COUNTER_FUNCTIONS | frozenset(
    {
        "abs",
        "absent",
        "absent_over_time",
        "avg_over_time",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "count_over_time",
        "delta",
        "deriv",
        "exp",
        "floor",
        "histogram_quantile",
        "idelta",
        "label_join",
        "label_replace",
        "last_over_time",
        "ln",
        "log10",
        "log2",
        "max_over_time",
        "min_over_time",
        "predict_linear",
        "present_over_time",
        "quantile_over_time",
        "resets",
        "round",
        "scalar",
        "sgn",
        "sort",
        "sort_desc",
        "sqrt",
        "stddev_over_time",
        "stdvar_over_time",
        "sum_over_time",
        "time",
        "timestamp",
        "vector",
    }
)
KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "and",
        "or",
        "unless",
        "atan2",
        "inf",
        "nan",
        "Inf",
        "NaN",
    }
)


# --- what the collector exports --------------------------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    """The exposition, parsed: each sample name with its label names, and each family with its type."""

    labels: dict[str, frozenset[str]]  # sample name (what PromQL selects) -> label names
    family: dict[str, str]  # sample name -> family name
    types: dict[str, str]  # family name -> counter, gauge, histogram...


def parse_exposition(text: str) -> Exported:
    labels: dict[str, set[str]] = {}
    family: dict[str, str] = {}
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            labels.setdefault(s.name, set()).update(s.labels)
            family[s.name] = fam.name
    return Exported({k: frozenset(v) for k, v in labels.items()}, family, types)


def representative_data(tmp_path: Path) -> dict:
    """Monitor.metrics_data() with a serving worker (all four histograms, a failure, a driver fault, a stall,
    shared memory), a worker slot that is down, and one GPU with every NVML reading, so that every family the
    collector builds has samples."""
    mon = Monitor(Config(), tmp_path)
    mon.start([])
    try:
        mon.set_worker("w0", 4321, "GPU-1")
        mon.set_worker("w1", None, "GPU-1")
        journal = DriverJournal()
        journal.mark_ready()
        now = time.monotonic_ns()
        journal.record("pinned_alloc", now - 2_000_000, now - 1_000_000, "64 MiB")
        tel = WorkerTelemetry("w0", mon.cfg.monitor, journal, "blocking")
        for i in range(100):
            tel.on_batch(batch(500.0 if i % 10 else 5000.0), 150.0, (now + i * 1000, now + i * 1000 + 500))
        tel.note_failure(20)
        tel.note_queue(3, 1)
        mon.on_report("w0", tel.report())
        mon.on_shm(
            "w0",
            {
                "enabled": True,
                "requests": 40,
                "bytes": 1 << 20,
                "leases": 2,
                "arena_bytes": 64 << 20,
                "free_bytes": 32 << 20,
            },
        )
        now = time.monotonic_ns()
        mon.on_stall("w0", driver_lock_stall(now))
        data = mon.metrics_data()
    finally:
        mon.stop()
    data["nvml"] = True
    data["gpus"] = [
        {
            "index": 0,
            "uuid": "GPU-1",
            "name": "NVIDIA H200",
            "sm_clock_mhz": 1410,
            "sm_clock_max_mhz": 1980,
            "mem_clock_mhz": 3201,
            "power_w": 693.0,
            "power_limit_w": 700.0,
            "temp_c": 71,
            "temp_slowdown_c": 87,
            "mem_temp_c": 80,
            "util_pct": 98,
            "mem_used_bytes": 1 << 30,
            "throttle_reasons": ["sw_power_cap"],
            "foreign_pids": [77],
            "supported_reasons": None,
            "reason_counters_ns": {"sw_power_cap": 4_848_582_848},
        }
    ]
    return data


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> str:
    data = representative_data(tmp_path_factory.mktemp("grafana"))
    return generate_latest(make_registry(lambda: data)).decode()


@pytest.fixture(scope="module")
def exported(exposition: str) -> Exported:
    return parse_exposition(exposition)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


# --- the checker -----------------------------------------------------------------------------------------


def _closing(s: str, i: int) -> int:
    """Index of the bracket closing the one at s[i] (strings already blanked)."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    depth = 0
    for j in range(i, len(s)):
        if s[j] == s[i]:
            depth += 1
        elif s[j] == pairs[s[i]]:
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced {s[i]!r} at {i} in {s!r}")


def _explain(name: str, exp: Exported) -> str:
    if not name.startswith("orchestrator_"):
        return f"{name}: not a metric of this project (names start with orchestrator_)"
    if name in exp.types:
        series = sorted(s for s, f in exp.family.items() if f == name)
        return f"{name}: the {exp.types[name]} family {name} is exposed as {', '.join(series)}"
    for suffix in SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in exp.types:
            series = sorted(s for s, f in exp.family.items() if f == base)
            return (
                f"{name}: the {exp.types[base]} {base} has no {suffix} series "
                f"(it is exposed as {', '.join(series)})"
            )
    return f"{name}: not exported by MonitorCollector"


@dataclass
class _Selector:
    name: str
    start: int
    end: int
    matchers: list[str]


def check_expr(expr: str, exp: Exported, legend: str = "") -> list[str]:
    """Problems with one PromQL expression (and its legend format) against the exported series."""
    problems: list[str] = []
    text = _GRAFANA_DURATIONS.sub("5m", expr)
    blank = _STRING.sub(lambda m: m.group()[0] + " " * (len(m.group()) - 2) + m.group()[-1], text)
    if "$" in blank:
        problems.append(f"a Grafana variable outside a string in {expr!r}")
    modifiers = [
        (m.group(1), [x.strip() for x in m.group(2).split(",") if x.strip()], m.start(), m.end())
        for m in _MODIFIER.finditer(blank)
    ]
    # metric names: identifiers that are not functions, keywords, label lists, matchers or durations
    scan = blank
    for _, _, a, b in modifiers:
        scan = scan[:a] + " " * (b - a) + scan[b:]
    selectors: list[_Selector] = []
    pos = 0
    while (m := _IDENT.search(scan, pos)) is not None:
        ident, pos = m.group(), m.end()
        rest = scan[pos:].lstrip()
        if rest.startswith("("):
            if ident not in FUNCTIONS | AGGREGATIONS:
                problems.append(f"{ident}: unknown PromQL function in {expr!r}")
            continue
        if ident in KEYWORDS:
            continue
        end = pos
        matchers: list[str] = []
        if rest.startswith("{"):
            brace = scan.index("{", pos)
            end = _closing(scan, brace) + 1
            matchers = _MATCHER.findall(blank[brace:end])
            pos = end
        selectors.append(_Selector(ident, m.start(), end, matchers))
        if ident == "__name__" or "__name__" in matchers:
            problems.append(f"__name__ matcher in {expr!r}: the metric name cannot be checked")
    known = [s for s in selectors if s.name in exp.labels]
    for s in selectors:
        if s.name not in exp.labels:
            problems.append(_explain(s.name, exp))
            continue
        for label in s.matchers:
            if label not in exp.labels[s.name] | TARGET_LABELS:
                problems.append(f"{s.name} has no label {label!r} (labels: {sorted(exp.labels[s.name])})")

    def inside(a: int, b: int) -> list[_Selector]:
        return [s for s in known if a <= s.start < b]

    # aggregations: `agg by (l) (arg)` or `agg (arg) by (l)`; `by` labels must be on every metric aggregated
    aggregations: list[
        tuple[int, int, str | None, list[str]]
    ] = []  # (arg start, arg end, by|without, labels)
    for m in re.finditer(r"(?<![\w:])(" + "|".join(sorted(AGGREGATIONS)) + r")\s*(?=[(bw])", blank):
        after = blank[m.end() :]
        mod = re.match(r"(by|without)\s*\(([^()]*)\)\s*", after)
        if mod:
            open_at = m.end() + mod.end()
        else:
            open_at = m.end()
        if blank[open_at : open_at + 1] != "(":
            continue
        close = _closing(blank, open_at)
        if not mod:
            mod = re.match(r"\s*(by|without)\s*\(([^()]*)\)", blank[close + 1 :])
        kind = mod.group(1) if mod else None
        labels = [x.strip() for x in mod.group(2).split(",") if x.strip()] if mod else []
        aggregations.append((open_at, close, kind, labels))
        for label in labels:
            if label in TARGET_LABELS:
                continue
            over = inside(open_at, close)
            copied = {
                x
                for k, ls, start, _ in modifiers
                if k.startswith("group_") and open_at <= start < close
                for x in ls
            }  # a group_left/right join inside brings these labels to every series
            if kind == "by" and label in copied and any(label in exp.labels[s.name] for s in over):
                continue
            if kind == "by":
                missing = [s.name for s in over if label not in exp.labels[s.name]]
                if missing:
                    problems.append(
                        f"by ({label}) over {', '.join(sorted(set(missing)))}, which has no label {label!r}"
                    )
            elif not any(label in exp.labels[s.name] for s in over):
                problems.append(f"without ({label}): no metric aggregated has label {label!r}")
    for kind, labels, _, _ in modifiers:  # on/ignoring match both sides; group_* copy labels from one
        for label in (x for x in labels if x not in TARGET_LABELS):
            if kind in ("on", "ignoring"):
                missing = sorted({s.name for s in known if label not in exp.labels[s.name]})
                if missing:
                    problems.append(
                        f"{kind} ({label}) with {', '.join(missing)}, which has no label {label!r}"
                    )
            elif kind.startswith("group_") and not any(label in exp.labels[s.name] for s in known):
                problems.append(f"{kind} ({label}): no metric in {expr!r} has label {label!r}")
    # functions whose argument has to be of a given kind
    for m in re.finditer(r"(?<![\w:])(rate|irate|increase|histogram_quantile)\s*\(", blank):
        open_at = m.end() - 1
        close = _closing(blank, open_at)
        for s in inside(open_at, close):
            if m.group(1) in COUNTER_FUNCTIONS and exp.types[exp.family[s.name]] not in (
                "counter",
                "histogram",
            ):
                problems.append(f"{m.group(1)}() over {s.name}, a {exp.types[exp.family[s.name]]}")
            if m.group(1) == "histogram_quantile" and not s.name.endswith("_bucket"):
                problems.append(f"histogram_quantile over {s.name}, not a _bucket series")
        if m.group(1) == "histogram_quantile":
            for a, _, kind, labels in aggregations:
                if open_at < a < close and not (
                    (kind == "by" and "le" in labels) or (kind == "without" and "le" not in labels)
                ):
                    problems.append(f"histogram_quantile in {expr!r} aggregates the le label away")
    # legend labels must survive the expression
    if aggregations:
        outer = [
            (kind, labels)
            for a, b, kind, labels in aggregations
            if not any(a2 < a and b < b2 for a2, b2, _, _ in aggregations)
        ]
        kept: set[str] = set()
        for kind, labels in outer:
            if kind == "by":
                kept |= set(labels)
            elif kind == "without":
                kept |= (set().union(*(exp.labels[s.name] for s in known)) | TARGET_LABELS) - set(labels)
    else:
        kept = set().union(*(exp.labels[s.name] for s in known)) | TARGET_LABELS
    for label in _LEGEND_LABEL.findall(legend):
        if label not in kept:
            problems.append(f"legend {{{{{label}}}}}: the result of {expr!r} has no label {label!r}")
    if not selectors:
        problems.append(f"no metric in {expr!r}")
    return problems


def _variable_queries(dash: dict) -> list[tuple[str, str]]:
    out = []
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        texts = {
            var.get("definition") or "",
            query.get("query", "") if isinstance(query, dict) else query or "",
        }
        out += [(f"variable {var['name']}", t) for t in texts if t]
    return out


def check_label_values(query: str, exp: Exported) -> list[str]:
    m = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_]\w*)\s*\)\s*", query, re.S)
    if not m:
        return [f"{query!r}: only label_values(<selector>, <label>) is supported"]
    problems = check_expr(m.group(1), exp)
    names = [n for n in _IDENT.findall(_STRING.sub('""', m.group(1))) if n in exp.labels]
    for name in names:
        if m.group(2) not in exp.labels[name] | TARGET_LABELS:
            problems.append(f"label_values: {name} has no label {m.group(2)!r}")
    return problems


def iter_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash.get("panels", []):
        out.append(p)
        out += p.get("panels", [])  # a collapsed row keeps its panels inside it
    return out


def check_dashboard(dash: dict, exp: Exported) -> list[str]:
    """Every problem of the dashboard's queries against the exported series, prefixed with where it is."""
    problems: list[str] = []
    for p in iter_panels(dash):
        for t in p.get("targets", []):
            where = f"panel {p.get('id')} {p.get('title')!r} target {t.get('refId')}"
            problems += [
                f"{where}: {x}" for x in check_expr(t.get("expr", ""), exp, t.get("legendFormat", ""))
            ]
    for where, query in _variable_queries(dash):
        problems += [f"{where}: {x}" for x in check_label_values(query, exp)]
    return problems


def used_series(dash: dict) -> set[str]:
    exprs = [t.get("expr", "") for p in iter_panels(dash) for t in p.get("targets", [])]
    exprs += [q for _, q in _variable_queries(dash)]
    return {n for e in exprs for n in _IDENT.findall(_STRING.sub('""', e)) if n.startswith("orchestrator_")}


# --- tests -----------------------------------------------------------------------------------------------


def test_dashboard_loads_with_unique_ids_titles_and_targets(dashboard: dict) -> None:
    assert 38 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"] and dashboard["title"]
    panels = iter_panels(dashboard)
    ids = [p.get("id") for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), ids
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert {"instance", "worker", "gpu"} <= set(variables)
    ds = {"type": "prometheus", "uid": "${datasource}"}
    for p in panels:
        assert p.get("title"), p
        if p["type"] == "row":  # a row only groups panels
            assert not p.get("targets"), p["title"]
            continue
        assert p.get("targets"), f"panel {p['id']} {p['title']!r} has no target"
        assert p.get("datasource") == ds, p["title"]
        refs = [t.get("refId") for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t.get("expr") and t.get("datasource") == ds, (p["title"], t)
            for var in _VARIABLE.findall(t["expr"]):
                assert var.startswith("__") or var in variables, (p["title"], var)
    for name in ("instance", "worker", "gpu"):
        assert variables[name]["datasource"] == ds and "label_values" in variables[name]["definition"]


def test_every_family_has_samples(exposition: str) -> None:
    """The representative data emits every family, so the exported set is complete."""
    empty = [f.name for f in text_string_to_metric_families(exposition) if not f.samples]
    assert not empty, f"representative_data() leaves these families without samples: {empty}"


def test_dashboard_uses_only_exported_metrics_and_labels(dashboard: dict, exported: Exported) -> None:
    problems = check_dashboard(dashboard, exported)
    assert not problems, "\n".join(problems)


def test_dashboard_shows_every_exported_family(dashboard: dict, exported: Exported) -> None:
    shown = {exported.family[s] for s in used_series(dashboard) if s in exported.family}
    assert set(exported.types) - shown == set(), "families with no panel"


@pytest.mark.parametrize(
    ("old", "new", "reported"),
    [
        (
            "orchestrator_request_latency_seconds_bucket",
            "orchestrator_request_latency_second_bucket",
            "orchestrator_request_latency_second_bucket: not exported",
        ),
        (
            "orchestrator_gpu_power_limit_watts",
            "orchestrator_gpu_power_limits_watts",
            "orchestrator_gpu_power_limits_watts: not exported",
        ),
        (
            "orchestrator_requests_total",
            "orchestartor_requests_total",
            "orchestartor_requests_total: not a metric",
        ),
        (
            "orchestrator_requests_total",
            "orchestrator_requests",
            "the counter family orchestrator_requests is exposed as orchestrator_requests_total",
        ),
        (
            "orchestrator_queue_wait_seconds_bucket",
            "orchestrator_queue_wait_seconds",
            "orchestrator_queue_wait_seconds_bucket, orchestrator_queue_wait_seconds_count",
        ),
        (
            "orchestrator_worker_up{",
            "orchestrator_worker_up_total{",
            "the gauge orchestrator_worker_up has no _total",
        ),
        (
            "orchestrator_items_total",
            "orchestrator_items_created",
            "the counter orchestrator_items has no _created",
        ),
        (
            "orchestrator_stalls_total",
            "orchestrator_stalls_count",
            "the counter orchestrator_stalls has no _count",
        ),
        ('gpu=~"$gpu"', 'gpu_index=~"$gpu"', "has no label 'gpu_index'"),
        ("by (instance, gpu, reason)", "by (instance, gpu, cause)", "which has no label 'cause'"),
        (
            "sum by (instance, worker) (rate(orchestrator_requests_total",
            "sum by (instance, gpu) (rate(orchestrator_requests_total",
            "which has no label 'gpu'",
        ),
        (
            "sum by (instance, worker, le) (rate(orchestrator_request_latency_seconds_bucket",
            "sum by (instance, worker) (rate(orchestrator_request_latency_seconds_bucket",
            "aggregates the le label",
        ),
        (
            "rate(orchestrator_shm_requests_total",
            "rate(orchestrator_shm_leases",
            "over orchestrator_shm_leases, a gauge",
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(orchestrator_request_latency_seconds_bucket",
            "histogram_quantile(0.99, sum by (le) (rate(orchestrator_request_latency_seconds_count",
            "has no label 'le'",
        ),
        (
            'orchestrator_worker_up{instance=~"$instance"}, worker)',
            'orchestrator_worker_up{instance=~"$instance"}, workers)',
            "has no label 'workers'",
        ),
        ("{{instance}} {{worker}} code {{code}}", "{{instance}} {{gpu}} code {{code}}", "has no label 'gpu'"),
        (
            'orchestrator_gpu_sm_clock_hertz{instance=~"$instance", gpu=~"$gpu"} / ',
            'orchestrator_gpu_sm_clock_hertz{instance=~"$instance", gpu=~"$gpu"} / on (instance, worker) ',
            "on (worker) with orchestrator_gpu_sm_clock_hertz, orchestrator_gpu_sm_clock_max_hertz",
        ),
    ],
)
def test_checker_catches_a_mutated_dashboard(
    dashboard: dict, exported: Exported, old: str, new: str, reported: str
) -> None:
    text = json.dumps(dashboard)
    old, new = json.dumps(old)[1:-1], json.dumps(new)[1:-1]  # as written inside JSON strings
    assert old in text, old
    mutated = json.loads(text.replace(old, new))
    problems = check_dashboard(mutated, exported)
    assert any(reported in p for p in problems), "\n".join(problems) or "no problem found"
    assert not check_dashboard(copy.deepcopy(dashboard), exported)
