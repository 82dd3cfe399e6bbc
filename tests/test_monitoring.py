"""The Grafana dashboard and the Prometheus alerts (config/grafana/, config/prometheus/) ask only
for series a real ``postroom metrics`` serves, with labels it writes, and promtool accepts and
unit-tests the rules and the config docker-compose's Prometheus loads.

A renamed metric or label would leave a dashboard panel empty and an alert silent without a
word from either: these tests are where such a rename fails."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_deploy import compose_config
from test_health import scraped_once

from support.queue import QueueEnv, unique
from support.smtpd import SmtpServer
from worker.db.vocabulary import JobState, RecipientState
from worker.ops.health import AccountHealth
from worker.queue.store import ready
from worker.queue.store.jobs import JobStore
from worker.records.webhooks import new_secret
from worker.web.status import ACCOUNT_STATES

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "config" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "postroom.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "postroom.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "postroom.yaml"
PROMETHEUS_CONFIG = REPO / "config" / "prometheus.yml"
ALERTS = REPO / "config" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "config" / "prometheus" / "alerts_test.yml"

METRIC = re.compile(r"\bpostroom_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(postroom_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# the values Postroom writes for a label it matches on (a typo'd value selects nothing, silently)
VALUES = {
    ("postroom_account_state", "state"): set(ACCOUNT_STATES),
    ("postroom_deliveries_total", "outcome"): {*JobState, RecipientState.BOUNCED, RecipientState.COMPLAINED},
    ("postroom_webhook_deliveries_total", "outcome"): {"delivered", "failed_attempt", "given_up"},
}


def promtool() -> str:
    """Debian's promtool (package prometheus); missing, the tests fail: they check what compose
    loads, and a skip would let a broken rule file through."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "no promtool on PATH: the monitoring tests need Debian's prometheus package "
            "(`make tools` as root installs it: apt-get install prometheus)",
            pytrace=False,
        )
    return found


def run_promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard: its panels' targets and its variables' queries."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else str(query))
    return exprs


def alert_expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def exported(own_queue: QueueEnv, server: SmtpServer) -> dict[str, set[str]]:
    """Sample name -> the label names it carries, from a real ``postroom metrics`` process's
    scrape, with data in every family the dashboard and the alerts read: a sent job (counters,
    latency histogram), a job waiting (oldest ready), a health check (healthy, last check and
    success), a webhook. A name with a ``# TYPE`` line but no sample is taken with its
    suffixes (``_total``; ``_bucket``, ``_sum``, ``_count``) and no labels."""
    account = own_queue.account(unique("acct"), server)
    hooks = own_queue.config / "webhooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "crm.yaml").write_text(f"url: https://hooks.example.com/crm\nsecret: {new_secret()}\n")
    store = JobStore(own_queue.redis)
    store.finish(unique("job"), account, state="sent", attempt=1, transport="smtp", latency=0.3)
    with own_queue.redis.pipeline() as pipe:
        ready.add_into(pipe, unique("job"), account, time.time() - 120)
        # a job given back 30 s ago, scored ahead of the rest (ready.restore): it waited less
        ready.add_into(pipe, unique("job"), account, time.time() - 30 - ready.AHEAD)
        pipe.execute()
    AccountHealth(own_queue.redis).record_check(
        {"account": account, "ok": True, "result": "ok", "checked_at": time.time()}
    )
    text = scraped_once(own_queue)
    names: dict[str, set[str]] = {}
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        for suffix in SUFFIXES.get(kind, ("",)):
            names.setdefault(family + suffix, set())
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    for sample in samples:
        names.setdefault(sample.name, set()).update(sample.labels)
    waited = [s.value for s in samples if s.name == "postroom_oldest_ready_job_age_seconds"]
    # the job due two minutes ago: not the one given back, nor its score lowered by AHEAD
    assert waited and 119 < max(waited) < 180, waited
    return names


def test_the_dashboard_and_the_alerts_use_only_what_postroom_exports(
    own_queue: QueueEnv, smtp_server: Any
) -> None:
    names = exported(own_queue, smtp_server(mode="plain"))
    exprs = dashboard_expressions() + alert_expressions()
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    # the test reads something: the panels' families, a histogram's buckets among them
    assert len(used) >= 12 and "postroom_delivery_latency_seconds_bucket" in used, used
    assert sorted(used - set(names)) == [], f"not exported: {sorted(used - set(names))}"
    for expr in exprs:
        assert METRIC.search(expr), f"an expression that reads no Postroom series: {expr}"
        in_expr = set(METRIC.findall(expr))
        labels = set().union(*(names[m] for m in in_expr))
        for metric, matchers in SELECTOR.findall(expr):
            for label, _, value in MATCHER.findall(matchers):
                assert label in names[metric], f"{metric} has no label {label!r}: {expr}"
                known = VALUES.get((metric, label))
                if known is not None and not value.startswith("$"):
                    for alternative in value.split("|"):
                        assert alternative in known, f"{metric}{{{label}}} is never {alternative!r}"
        for grouping in GROUPING.findall(expr):
            for label in filter(None, (part.strip() for part in grouping.split(","))):
                assert label in labels, f"no series in {expr!r} has a label {label!r}"


def test_the_dashboard_loads_and_names_the_provisioned_datasource() -> None:
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    titles = {p["title"] for p in board["panels"]}
    for wanted in (
        "Account health",
        "Account state",
        "Deliveries by outcome",
        "Failures by class",
        "Send latency",
        "Queue depth",
        "Oldest waiting job",
        "Webhook deliveries",
    ):
        assert wanted in titles, wanted
    source = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert len(source) == 1 and source[0]["type"] == "prometheus"
    uid = source[0]["uid"]
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"] and all(t["datasource"]["uid"] == uid for t in panel["targets"])
    assert all(v["datasource"]["uid"] == uid for v in board["templating"]["list"])
    # the grid: no two panels overlap (Grafana would push one down, silently)
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        here = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & here and all(x < 24 for x, _ in here), panel["title"]
        cells |= here


def binds(service: dict[str, Any]) -> dict[str, str]:
    """A service's bind mounts as {path in the repository: path in the container}, from
    docker-compose's resolved config (short "source:target:mode" or long form alike)."""
    out = {}
    for volume in service["volumes"]:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        elif volume.get("type") == "bind":
            source, target = volume["source"], volume["target"]
        else:
            continue
        if source.startswith("/"):
            out[Path(source).relative_to(REPO).as_posix()] = target
    return out


def test_compose_mounts_the_rules_and_the_grafana_provisioning() -> None:
    services = compose_config("grafana")["services"]
    mounted = binds(services["prometheus"])
    config_at = Path(mounted["config/prometheus.yml"]).parent
    rule_files = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["rule_files"]
    rules_at = Path(mounted["config/prometheus"])
    # each rule file, relative to the config, names the same file here and in the container
    assert rule_files
    for rule_file in rule_files:
        assert (PROMETHEUS_CONFIG.parent / rule_file).resolve() == ALERTS
        assert config_at / rule_file == rules_at / ALERTS.name
    grafana = services["grafana"]
    assert grafana["profiles"] == ["grafana"] and grafana["image"] == "grafana/grafana:11.1.0"
    grafana_binds = binds(grafana)
    assert grafana_binds["config/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_path = yaml.safe_load(PROVIDERS.read_text())["providers"][0]["options"]["path"]
    assert grafana_binds["config/grafana/dashboards"] == dashboards_path
    assert yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["url"] == "http://prometheus:9090"


def test_promtool_accepts_the_rules_and_the_config() -> None:
    rules = run_promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_expressions())} rules found" in rules.stdout
    config = run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 1 rule files found" in config.stdout  # the rules are loaded, not only valid
    every = yaml.safe_load(ALERTS.read_text())["groups"]
    for rule in (r for group in every for r in group["rules"]):
        assert rule.get("for") and rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_promtool_unit_tests_fire_each_alert_and_only_when_in_trouble(tmp_path: Path) -> None:
    done = run_promtool("test", "rules", str(ALERTS_TEST))
    assert done.returncode == 0, done.stdout + done.stderr
    # every alert has its test, a firing one
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fired = {
        re.search(r'alertname="(\w+)"', t["expr"]).group(1)  # type: ignore[union-attr]
        for test in tests
        for t in test.get("promql_expr_test", [])
        if 'alertstate="firing"' in t["expr"] and t["exp_samples"]
    }
    quiet = {
        t["alertname"] for test in tests for t in test.get("alert_rule_test", []) if t["exp_alerts"] == []
    }
    names = {r["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for r in group["rules"]}
    assert fired == names and quiet == names
    # and the unit tests can fail: with a threshold ten times higher, an alert no longer fires
    (tmp_path / "alerts.yml").write_text(ALERTS.read_text().replace("> 300", "> 3000"))
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    broken = run_promtool("test", "rules", ALERTS_TEST.name, cwd=tmp_path)
    assert broken.returncode != 0 and "PostroomOldestJobWaiting" in broken.stdout + broken.stderr
