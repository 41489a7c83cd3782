"""Checks of the deployment files under deploy/.

What can be checked on a machine without a container engine:

* every YAML file parses and has the structure the stack needs (compose
  services and networks, Prometheus scrape targets, alert rules, Grafana
  provisioning), and the pieces agree with each other (node names, ports,
  trusted-proxy CIDR, datasource uid, mount paths, required variables);
* every PromQL expression (alerts and dashboard) names only metrics listed in
  docs/metrics.md (parsed here, so the two cannot drift) or ``up``;
* the Dockerfile's instructions (base image, non-root user, health check,
  entrypoint, no secrets), also as read by BuildKit's own parser (Python
  package ``dockerfile``) when installed, and its health-check command, run
  for real against a stub;
* with external tools, when they are installed (otherwise the test is skipped
  and says which tool is missing): ``promtool check config``, ``promtool check
  rules`` (also on every dashboard query), ``promtool test rules`` (alert unit
  tests), ``nginx -t`` and a live nginx on loopback with two stub nodes behind
  it (TLS versions, forwarded headers, body limit, anonymised access log),
  ``openssl`` through deploy/nginx/make-cert.sh, and ``systemd-analyze verify``
  and ``systemd-analyze security``.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import warnings
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
METRICS_DOC = ROOT / "docs" / "metrics.md"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
MAKE_CERT = DEPLOY / "nginx" / "make-cert.sh"
PROM_DIR = DEPLOY / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "telemetry-ingest.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "telemetry-ingest.yml"
UNIT = DEPLOY / "systemd" / "telemetry-ingest.service"

NODE_PORT = 8080
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|MASTER_KEY|PRIVATE_KEY|DSN", re.I)

REQUIRED_ALERTS = {
    "TelemetryIngestDown",
    "TelemetryIngestHigh5xxRate",
    "TelemetryIngestHigh503Rate",
    "TelemetryIngestQueueDepthHigh",
    "TelemetryIngestSweeperStalled",
    "TelemetryIngestScanRetentionExceeded",
    "TelemetryIngestDbPoolExhausted",
}


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed on this machine; this validation did not run")
    return path


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)


def load_yaml(path: Path):
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


# --------------------------------------------------------------------------
# docs/metrics.md: the metric names the service exports
# --------------------------------------------------------------------------

def documented_metrics() -> dict[str, str]:
    """{name: type} from the table in docs/metrics.md."""
    metrics = {}
    row = re.compile(r"^\|\s*`(telemetry_[a-z0-9_]+)`\s*\|\s*(counter|gauge|histogram|summary)\s*\|")
    for line in METRICS_DOC.read_text(encoding="utf-8").splitlines():
        m = row.match(line)
        if m:
            metrics[m.group(1)] = m.group(2)
    return metrics


def series_names() -> dict[str, str]:
    """Every series name a scrape can carry -> the documented metric it belongs to."""
    names = {}
    for name, kind in documented_metrics().items():
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[name + suffix] = name
        elif kind == "summary":
            for suffix in ("", "_sum", "_count"):
                names[name + suffix] = name
        else:
            names[name] = name
    return names


ALLOWED_EXTRA = {"up"}  # Prometheus' own per-target series

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (a small lexer, enough
    for selectors, functions, aggregations and binary operators)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)  # ranges, subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?", s):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def test_metrics_doc_table_parses():
    metrics = documented_metrics()
    assert len(metrics) >= 10, "the metrics table in docs/metrics.md was not found"
    assert metrics["telemetry_requests_total"] == "counter"
    assert metrics["telemetry_request_duration_seconds"] == "histogram"
    assert metrics["telemetry_queue_depth"] == "gauge"


def test_promql_metric_name_lexer():
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(telemetry_request_duration_seconds_bucket'
        '{job="x", instance=~"$instance"}[$__rate_interval]))) > 1e3 '
        'and on(instance) up offset 5m'
    )
    assert promql_metric_names(expr) == {"telemetry_request_duration_seconds_bucket", "up"}
    assert promql_metric_names(
        'sum by (job) (a_total{status=~"5.."}) / ignoring(state) group_left b{state="size"}'
    ) == {"a_total", "b"}
    assert promql_metric_names("time() - max by (job) (x_seconds) > 3 * 60") == {"x_seconds"}


def assert_known_metrics(where: str, expr: str):
    names = promql_metric_names(expr)
    assert names, f"{where}: no metric found in {expr!r}"
    unknown = names - set(series_names()) - ALLOWED_EXTRA
    assert not unknown, f"{where}: metric(s) {sorted(unknown)} are not in docs/metrics.md: {expr!r}"
    return names


# --------------------------------------------------------------------------
# compose.yaml
# --------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class MissingVariable(Exception):
    pass


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR:?error}, $$ interpolation."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        val = env.get(name)
        if op in (":-", "-"):
            return val if (val if op == ":-" else val is not None) else arg
        if op in (":?", "?"):
            if not val:
                raise MissingVariable(f"{name}: {arg}")
            return val
        return val or ""
    return _VAR.sub(sub, value)


def required_variables(text: str) -> set[str]:
    return {m.group(1) for m in _VAR.finditer(text) if m.group(2) in (":?", "?")}


@pytest.fixture(scope="module")
def compose():
    return load_yaml(COMPOSE)


def ingest_nodes(compose) -> dict[str, dict]:
    return {
        name: svc for name, svc in compose["services"].items()
        if isinstance(svc.get("build"), dict) and svc["build"].get("dockerfile") == "deploy/Dockerfile"
    }


def env_of(svc) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


FAKE_ENV = {"POSTGRES_PASSWORD": "pw", "TELEMETRY_MASTER_KEY": "k", "GRAFANA_ADMIN_PASSWORD": "g", "TELEMETRY_SERVICE_PASSWORD": "spw"}


def test_compose_services(compose):
    services = compose["services"]
    for name in ("postgres", "proxy", "prometheus", "grafana"):
        assert name in services, f"compose.yaml has no service {name!r}"
    assert services["postgres"]["image"].startswith("postgres:16"), "PostgreSQL 16 expected"
    nodes = ingest_nodes(compose)
    assert sorted(nodes) == ["ingest-1", "ingest-2"], f"two ingest nodes expected, got {sorted(nodes)}"
    assert services["proxy"]["image"].startswith("nginx:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/")


def test_compose_ingest_nodes(compose):
    networks = compose["networks"]
    proxy_networks = set(compose["services"]["proxy"]["networks"])
    for name, svc in ingest_nodes(compose).items():
        ctx = (DEPLOY / svc["build"]["context"]).resolve()
        assert (ctx / "pyproject.toml").is_file(), f"{name}: build context {ctx} is not the repository"
        assert (ctx / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
        env = env_of(svc)
        assert env["TELEMETRY_HOST"] == "0.0.0.0", f"{name} must listen on all interfaces"
        assert interpolate(env["TELEMETRY_PORT"], {}) == str(NODE_PORT)
        dsn = interpolate(env["TELEMETRY_DSN"], FAKE_ENV)
        assert re.fullmatch(r"postgres(ql)?://telemetry:pw@postgres:5432/telemetry", dsn), dsn
        assert "TELEMETRY_MASTER_KEY" in required_variables(env["TELEMETRY_MASTER_KEY"]), (
            f"{name}: TELEMETRY_MASTER_KEY must come from a required variable, not be written here")
        assert "POSTGRES_PASSWORD" in required_variables(env["TELEMETRY_DSN"])
        # and they serve as a role of their own, on the same database (docs/admin.md#roles)
        service = interpolate(env["TELEMETRY_SERVICE_DSN"], FAKE_ENV)
        assert re.fullmatch(r"postgres(ql)?://telemetry_service:spw@postgres:5432/telemetry", service), service
        # The nodes believe X-Forwarded-For exactly from the proxy's network.
        shared = proxy_networks & set(svc["networks"])
        assert shared, f"{name} shares no network with the proxy"
        subnets = set()
        for net in shared:
            for cfg in networks[net]["ipam"]["config"]:
                subnets.add(interpolate(cfg["subnet"], {}))
        trusted = {c.strip() for c in interpolate(env["TELEMETRY_TRUSTED_PROXIES"], {}).split(",")}
        assert trusted == subnets, f"{name}: TELEMETRY_TRUSTED_PROXIES {trusted} != proxy network {subnets}"
        # also with the subnet overridden, both follow the same variable
        override = {"EDGE_SUBNET": "10.99.0.0/24"}
        assert interpolate(env["TELEMETRY_TRUSTED_PROXIES"], override) == "10.99.0.0/24"
        assert svc.get("read_only") is True, f"{name} should run with a read-only root filesystem"
        assert "ALL" in svc.get("cap_drop", [])
        assert "ports" not in svc, f"{name} must be reached through the proxy only"
        assert any(str(v).endswith(":/var/lib/telemetry-ingest") for v in svc.get("volumes", []))
        assert "postgres" in svc["depends_on"]


def test_compose_secrets_come_from_variables(compose):
    for sname, svc in compose["services"].items():
        for key, value in env_of(svc).items():
            if SECRET_NAME.search(key):
                assert required_variables(value), (
                    f"{sname}.{key} must come from a required ${{VAR:?}} variable, not a literal")
    example = DEPLOY / "env.example"
    listed = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", example.read_text(), re.M))
    missing = required_variables(COMPOSE.read_text()) - listed
    assert not missing, f"deploy/env.example does not list required variable(s) {sorted(missing)}"
    for line in example.read_text().splitlines():
        m = re.match(r"^([A-Z_]+)=(.*)$", line)
        if m and SECRET_NAME.search(m.group(1)):
            assert m.group(2) == "", f"env.example must not carry a value for {m.group(1)}"
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert ".env" in ignored and "nginx/certs/" in ignored


def test_compose_interpolates_only_when_secrets_are_given():
    text = COMPOSE.read_text()
    with pytest.raises(MissingVariable):
        interpolate(text, {})
    interpolate(text, FAKE_ENV)


def test_compose_bind_mounts_and_ports(compose):
    services = compose["services"]
    mounts = {}
    for sname, svc in services.items():
        for vol in svc.get("volumes", []):
            parts = str(vol).split(":")
            if parts[0].startswith("./"):
                mounts[(sname, parts[1])] = DEPLOY / parts[0][2:]
    assert mounts[("proxy", "/etc/nginx/nginx.conf")] == NGINX_CONF
    certs = mounts[("proxy", "/etc/nginx/certs")]
    assert certs == DEPLOY / "nginx" / "certs", "make-cert.sh writes to deploy/nginx/certs by default"
    assert mounts[("prometheus", "/etc/prometheus")] == PROM_DIR
    assert mounts[("grafana", "/etc/grafana/provisioning")] == GRAFANA / "provisioning"
    dash_mount = [t for (s, t), src in mounts.items() if s == "grafana" and src == DASHBOARD.parent]
    assert dash_mount, "the dashboards directory is not mounted into grafana"
    providers = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert providers[0]["options"]["path"] == dash_mount[0]
    for (sname, target), src in mounts.items():
        if src != certs:
            assert src.exists(), f"{sname} mounts {src}, which does not exist"
    # the TLS port is published; the UIs only on loopback
    assert any(str(p).endswith(":443") for p in services["proxy"]["ports"])
    for sname in ("prometheus", "grafana"):
        for port in services[sname]["ports"]:
            assert str(port).startswith("127.0.0.1:"), f"{sname} port {port} should bind to loopback only"
    for internal in ("db", "metrics"):
        assert compose["networks"][internal].get("internal") is True
    assert "db" in services["postgres"]["networks"]


# --------------------------------------------------------------------------
# Prometheus: scrape config and alert rules
# --------------------------------------------------------------------------

def test_prometheus_scrapes_every_node(compose):
    cfg = load_yaml(PROM_CONFIG)
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["telemetry-ingest"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{n}:{NODE_PORT}" for n in ingest_nodes(compose)}
    assert "alerts.yml" in cfg["rule_files"]
    # Prometheus reaches the nodes on a network they share
    prom_nets = set(compose["services"]["prometheus"]["networks"])
    for name, svc in ingest_nodes(compose).items():
        assert prom_nets & set(svc["networks"]), f"prometheus cannot reach {name}"


def alert_rules() -> dict[str, dict]:
    doc = load_yaml(ALERTS)
    rules = {}
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["alert"] not in rules, f"duplicate alert {rule['alert']}"
                rules[rule["alert"]] = rule
    return rules


def test_alert_rules_structure():
    rules = alert_rules()
    missing = REQUIRED_ALERTS - set(rules)
    assert not missing, f"alerts.yml lacks {sorted(missing)}"
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"].get("summary"), f"{name} has no summary"
        assert rule["annotations"].get("description"), f"{name} has no description"
        assert_known_metrics(f"alert {name}", rule["expr"])


def _threshold(expr: str) -> int:
    m = re.search(r">=?\s*([\d\s*+]+)$", expr.strip())
    assert m, f"no numeric threshold at the end of {expr!r}"
    assert re.fullmatch(r"[\d\s*+]+", m.group(1))
    return eval(m.group(1), {"__builtins__": {}})  # digits, *, + only (checked above)


def test_alert_expressions():
    rules = alert_rules()
    assert re.fullmatch(r'up\{job="telemetry-ingest"\}\s*==\s*0', rules["TelemetryIngestDown"]["expr"].strip())
    five = rules["TelemetryIngestHigh5xxRate"]["expr"]
    assert 'status=~"5.."' in five and "telemetry_requests_total" in five
    assert 'status="503"' in rules["TelemetryIngestHigh503Rate"]["expr"]
    # A fraction of each worker's queue capacity: a record count over the queue size could never be reached.
    assert re.fullmatch(r"max by \(job, instance, writer\) \(telemetry_queue_fill_ratio\) > 0\.5",
                        rules["TelemetryIngestQueueDepthHigh"]["expr"].strip())
    sweep = rules["TelemetryIngestSweeperStalled"]["expr"]
    assert "time()" in sweep and "telemetry_sweep_last_success_timestamp_seconds" in sweep
    assert _threshold(sweep) == 3 * 60, "3 sweep intervals of the default 60 s"
    scan = rules["TelemetryIngestScanRetentionExceeded"]["expr"]
    assert "telemetry_oldest_scan_age_seconds" in scan
    assert _threshold(scan) == 720 * 3600 + 2 * 60, "maximum retention 720 h plus two sweep intervals"
    pool = rules["TelemetryIngestDbPoolExhausted"]
    # in use against the pools' maximum size, not against the connections open at the moment
    assert 'state="in_use"' in pool["expr"] and 'state="max"' in pool["expr"] and ">=" in pool["expr"]
    assert 'state="size"' not in pool["expr"]
    assert pool["for"] == "5m"


def test_every_alert_has_a_unit_test_and_a_doc_entry():
    tests = load_yaml(ALERTS_TEST)
    assert tests["rule_files"] == ["alerts.yml"]
    fired = {
        case["alertname"]
        for t in tests["tests"] for case in t.get("alert_rule_test", []) if case.get("exp_alerts")
    }
    untested = set(alert_rules()) - fired
    assert not untested, f"alerts_test.yml never makes {sorted(untested)} fire"
    doc = DEPLOY_DOC.read_text(encoding="utf-8")
    undocumented = {name for name in alert_rules() if name not in doc}
    assert not undocumented, f"docs/deploy.md does not explain {sorted(undocumented)}"


def test_promtool_check_config():
    promtool = need_tool("promtool")
    res = run([promtool, "check", "config", PROM_CONFIG.name], cwd=PROM_DIR)
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_rules():
    promtool = need_tool("promtool")
    res = run([promtool, "check", "rules", ALERTS.name], cwd=PROM_DIR)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in res.stdout + res.stderr


def test_promtool_alert_unit_tests():
    promtool = need_tool("promtool")
    res = run([promtool, "test", "rules", ALERTS_TEST.name], cwd=PROM_DIR)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr


# --------------------------------------------------------------------------
# Grafana: provisioning and dashboard
# --------------------------------------------------------------------------

def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_queries(dashboard) -> list[tuple[str, str]]:
    out = []
    for p in walk_panels(dashboard["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel {p['id']} {p['title']!r} ref {t['refId']}", t["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q.strip())
            assert m, f"variable {var['name']}: unexpected query {q!r}"
            out.append((f"variable {var['name']}", m.group(1)))
    return out


def test_grafana_provisioning(compose):
    ds = load_yaml(DATASOURCES)["datasources"]
    assert len(ds) == 1 and ds[0]["type"] == "prometheus"
    assert ds[0]["url"] == "http://prometheus:9090"
    assert set(compose["services"]["grafana"]["networks"]) & set(compose["services"]["prometheus"]["networks"])
    providers = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert providers[0]["type"] == "file"


def test_dashboard_structure(dashboard):
    uid = load_yaml(DATASOURCES)["datasources"][0]["uid"]
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in walk_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in walk_panels(dashboard["panels"]):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == uid, f"panel {p['title']!r} uses another datasource"
            assert p["targets"], f"panel {p['title']!r} has no query"
            for t in p["targets"]:
                assert t["datasource"]["uid"] == uid
    refs = [v["datasource"]["uid"] for v in dashboard["templating"]["list"] if "datasource" in v]
    assert all(r == uid for r in refs)


def test_dashboard_uses_only_documented_metrics(dashboard):
    used = set()
    for where, expr in dashboard_queries(dashboard):
        used |= assert_known_metrics(where, expr)
    # and, the other way round, every documented metric is on the dashboard
    shown = {series_names()[n] for n in used if n in series_names()}
    unshown = set(documented_metrics()) - shown
    assert not unshown, f"no dashboard panel shows {sorted(unshown)}"


def test_dashboard_covers_the_issue(dashboard):
    titles = " | ".join(p["title"].lower() for p in walk_panels(dashboard["panels"]))
    exprs = " ".join(e for _, e in dashboard_queries(dashboard))
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(telemetry_request_duration_seconds_bucket" in exprs
    assert "sum by (route) (rate(telemetry_requests_total" in exprs
    assert "sum by (reason) (rate(telemetry_rejected_total" in exprs
    assert "sum by (category) (rate(telemetry_fields_dropped_total" in exprs
    for word in ("ingest rate", "latency", "rejections", "dropped", "batch", "flush", "queue",
                 "sweep", "oldest", "pool"):
        assert word in titles, f"no panel about {word!r}"


def test_dashboard_queries_parse_with_promtool(dashboard, tmp_path):
    promtool = need_tool("promtool")
    rules = []
    for i, (where, expr) in enumerate(dashboard_queries(dashboard)):
        e = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
        e = e.replace("$__range", "1h").replace("$instance", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": e})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = run([promtool, "check", "rules", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def exec_form(arg: str) -> list[str]:
    value = json.loads(arg)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), arg
    return value


@pytest.fixture(scope="module")
def dockerfile():
    return dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))


def final_stage(instrs):
    last_from = max(i for i, (k, _) in enumerate(instrs) if k == "FROM")
    return instrs[last_from:]


def test_dockerfile_base_and_build(dockerfile):
    args = {}
    for key, rest in dockerfile:
        if key == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args.setdefault(k, v)
    froms = [interpolate(rest.split()[0], args) for key, rest in dockerfile if key == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        assert re.fullmatch(r"python:3\.11-slim(-[a-z]+)?", image), f"base image {image}"
    runs = " ".join(rest for key, rest in dockerfile if key == "RUN")
    assert re.search(r"pip install [^&;]*/src\b|pip install \.", runs), "the package is not pip-installed"


def test_dockerfile_runtime(dockerfile):
    stage = final_stage(dockerfile)
    keys = [k for k, _ in stage]
    env = {}
    for key, rest in stage:
        if key == "ENV":
            for m in re.finditer(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', rest):
                env[m.group(1)] = m.group(2).strip('"')
    users = [rest for key, rest in stage if key == "USER"]
    assert users, "the runtime stage must switch to an unprivileged USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"
    assert keys.index("USER") > max(i for i, k in enumerate(keys) if k in ("RUN", "COPY")), (
        "USER must come after every RUN/COPY of the runtime stage")
    if user.isdigit():
        runs = " ".join(rest for key, rest in stage if key == "RUN")
        assert f"--uid {user}" in runs, f"uid {user} is not created in the image"
    entry = exec_form(next(rest for key, rest in stage if key == "ENTRYPOINT"))
    cmd = exec_form(next(rest for key, rest in stage if key == "CMD"))
    assert entry + cmd == ["telemetry-ingest", "serve"]
    health = next(rest for key, rest in stage if key == "HEALTHCHECK")
    assert "/healthz" in health and "CMD" in health
    assert env["TELEMETRY_HOST"] == "0.0.0.0"
    assert env["TELEMETRY_PORT"] == str(NODE_PORT)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    volumes = [v for key, rest in stage if key == "VOLUME" for v in exec_form(rest)]
    assert env["TELEMETRY_DATA_DIR"] in volumes, "the data directory must be a volume"
    assert env["HOME"] == env["TELEMETRY_DATA_DIR"], "HOME must be writable on a read-only root"
    assert ("STOPSIGNAL", "SIGTERM") in stage
    assert "EXPOSE" in keys


def test_dockerfile_has_no_secrets(dockerfile):
    for key, rest in dockerfile:
        if key in ("ENV", "ARG", "LABEL"):
            for m in re.finditer(r'([A-Za-z_][A-Za-z0-9_.]*)=', rest):
                assert not SECRET_NAME.search(m.group(1)), f"{key} {m.group(1)} looks like a secret"
        if key in ("COPY", "ADD"):
            assert not re.search(r"\.env\b|\.pem\b|\.key\b|telemetry-data", rest), f"{key} {rest}"
    text = DOCKERFILE.read_text()
    assert not re.search(r"BEGIN [A-Z ]*PRIVATE KEY|tii_|tia_|tie_|tiadm_", text)


def test_dockerignore_keeps_the_context_to_the_package():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "the ignore file should deny everything first"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    find = pyproject["tool"]["setuptools"]["packages"]["find"]
    packages = {p.rstrip("*") for p in find["include"]}
    # a package is found in one of the `where` directories (the client's under client/)
    present = {p for p in packages for w in find.get("where", ["."]) if (p if w == "." else f"{w}/{p}") in allowed}
    assert packages <= present, f"packages {sorted(packages - present)} are not in the build context"
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= allowed
    for secret in (".env", ".venv", ".git", "telemetry-data", "deploy"):
        assert secret not in allowed


DOCKERFILE_INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}


def test_dockerfile_with_the_buildkit_parser(dockerfile):
    """Parse with BuildKit's own parser (Go, through the `dockerfile` package)
    and check it reads the same instructions and runtime settings."""
    try:
        import dockerfile as buildkit
    except ImportError:
        pytest.skip("the Python package `dockerfile` (BuildKit's parser) is not installed; this validation did not run")
    cmds = buildkit.parse_file(str(DOCKERFILE))
    assert [c.cmd.upper() for c in cmds] == [k for k, _ in dockerfile]
    assert {c.cmd.upper() for c in cmds} <= DOCKERFILE_INSTRUCTIONS
    last_from = max(i for i, c in enumerate(cmds) if c.cmd.upper() == "FROM")
    final = cmds[last_from:]
    env = {}
    for c in final:
        if c.cmd.upper() == "ENV":
            env.update(zip(c.value[::2], c.value[1::2]))
    by_cmd = {c.cmd.upper(): c for c in final}
    assert env["TELEMETRY_HOST"] == "0.0.0.0"
    assert by_cmd["USER"].value[0].split(":")[0] not in ("root", "0")
    assert by_cmd["ENTRYPOINT"].json and by_cmd["CMD"].json
    assert list(by_cmd["ENTRYPOINT"].value + by_cmd["CMD"].value) == ["telemetry-ingest", "serve"]
    health = by_cmd["HEALTHCHECK"]
    assert health.json and health.value[0] == "CMD" and "/healthz" in " ".join(health.value)
    assert by_cmd["VOLUME"].value == (env["TELEMETRY_DATA_DIR"],)


class _StubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    status = 200
    node = "stub"
    seen: list

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        received = 0
        while received < length:
            chunk = self.rfile.read(min(1 << 20, length - received))
            if not chunk:
                break
            received += len(chunk)
        self.seen.append({"node": self.node, "method": self.command, "path": self.path,
                          "headers": dict(self.headers.items()), "body_len": received})
        body = json.dumps({"node": self.node}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args):
        pass


class StubNode:
    """A stand-in for a telemetry-ingest node on 127.0.0.1: answers every
    request with `status` and records what it received."""

    def __init__(self, node="stub", status=200, seen=None):
        self.seen = [] if seen is None else seen
        handler = type("H", (_StubHandler,), {"node": node, "status": status, "seen": self.seen})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dockerfile_healthcheck_command_works(dockerfile):
    health = next(rest for key, rest in final_stage(dockerfile) if key == "HEALTHCHECK")
    argv = exec_form(health[health.index("CMD") + 3:].strip())
    assert argv[0] == "python"
    argv = [sys.executable, *argv[1:]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")}
    with StubNode(status=200) as ok:
        res = run(argv, env={**env, "TELEMETRY_PORT": str(ok.port)})
        assert res.returncode == 0, res.stderr
        assert ok.seen[-1]["path"] == "/healthz"
    with StubNode(status=503) as down:
        assert run(argv, env={**env, "TELEMETRY_PORT": str(down.port)}).returncode != 0
    assert run(argv, env={**env, "TELEMETRY_PORT": str(free_port())}).returncode != 0


# --------------------------------------------------------------------------
# nginx reverse proxy
# --------------------------------------------------------------------------

def nginx_directives(text: str, name: str) -> list[str]:
    text = re.sub(r"#[^\n]*", "", text)
    return [m.group(1).strip() for m in re.finditer(rf"(?<![\w$]){re.escape(name)}\s+([^;{{]*);", text)]


def test_nginx_config_static(compose):
    text = NGINX_CONF.read_text()
    assert nginx_directives(text, "ssl_protocols") == ["TLSv1.2 TLSv1.3"]
    assert nginx_directives(text, "client_max_body_size") == ["16m"]
    headers = {h.split(None, 1)[0]: h.split(None, 1)[1] for h in nginx_directives(text, "proxy_set_header")}
    assert headers["X-Forwarded-For"] == "$remote_addr"
    assert headers["X-Forwarded-Proto"] == "$scheme"
    assert headers["Host"] == "$host"
    servers = {s.split()[0] for s in nginx_directives(text, "server")}
    assert servers == {f"{n}:{NODE_PORT}" for n in ingest_nodes(compose)}, "proxy to every node"
    assert nginx_directives(text, "proxy_request_buffering") == ["off"], "scan bodies must not be spooled to disk"
    assert nginx_directives(text, "proxy_max_temp_file_size") == ["0"]
    # error-level messages carry full client addresses ("client: 1.2.3.4")
    assert [e.split()[-1] for e in nginx_directives(text, "error_log")] == ["crit"]
    for fmt in nginx_directives(text, "log_format"):
        assert "$remote_addr " not in fmt + " " and "$http_x_forwarded_for" not in fmt, "log would keep full IPs"
    # the compose health check targets the loopback status listener
    hc = " ".join(compose["services"]["proxy"]["healthcheck"]["test"])
    m = re.search(r"http://127\.0\.0\.1:(\d+)(/\S*)", hc)
    assert m and f"listen 127.0.0.1:{m.group(1)};" in text and f"location = {m.group(2)}" in text


def make_cert(outdir: Path, host="localhost") -> tuple[Path, Path]:
    need_tool("openssl")
    res = run(["sh", str(MAKE_CERT), host, str(outdir)])
    assert res.returncode == 0, res.stderr
    return outdir / "fullchain.pem", outdir / "privkey.pem"


def test_make_cert_script(tmp_path):
    cert, key = make_cert(tmp_path / "certs", "telemetry.example.org")
    assert key.stat().st_mode & 0o077 == 0, "the private key must not be group/world readable"
    text = run(["openssl", "x509", "-in", str(cert), "-noout", "-text"]).stdout
    assert "DNS:telemetry.example.org" in text and "IP Address:127.0.0.1" in text
    assert "TLS Web Server Authentication" in text


def nginx_test_config(tmp: Path, nodes: list[int], https_port: int, health_port: int) -> Path:
    """A copy of deploy/nginx/nginx.conf that runs here: loopback ports, the
    stub nodes as upstreams, a generated certificate, paths under tmp."""
    text = NGINX_CONF.read_text()
    run_dir = tmp / "run"
    run_dir.mkdir()

    def sub(pattern, repl, text, count_expected=None):
        new, n = re.subn(pattern, lambda m: repl, text, flags=re.M)
        assert n and (count_expected is None or n == count_expected), f"{pattern!r} matched {n} times"
        return new

    text = sub(r"/tmp/", f"{run_dir}/", text)
    text = sub(r"/etc/nginx/certs/", f"{tmp}/certs/", text)
    upstreams = iter(nodes)
    text, n = re.subn(r"server ingest-\d+:8080", lambda m: f"server 127.0.0.1:{next(upstreams)}", text)
    assert n == len(nodes)
    text = sub(r"listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;", text, 1)
    text = sub(r"^\s*listen \[::\]:443 ssl;\n", "", text, 1)
    text = sub(r"listen 127\.0\.0\.1:8081;", f"listen 127.0.0.1:{health_port};", text, 1)
    text = sub(r"access_log /dev/stdout ", f"access_log {tmp}/access.log ", text, 1)
    text = sub(r"^user nginx;", "user root;" if os.geteuid() == 0 else "", text, 1)
    make_cert(tmp / "certs")
    conf = tmp / "nginx.conf"
    conf.write_text(text)
    return conf


def test_nginx_config_test_mode(tmp_path):
    nginx = need_tool("nginx")
    conf = nginx_test_config(tmp_path, [free_port(), free_port()], free_port(), free_port())
    res = run([nginx, "-t", "-c", str(conf), "-p", f"{tmp_path}/", "-e", "stderr"])
    assert res.returncode == 0, res.stderr
    assert "test is successful" in res.stderr


@pytest.fixture(scope="module")
def live_proxy(tmp_path_factory):
    """nginx with the (test copy of the) real config in front of two stub nodes."""
    nginx = need_tool("nginx")
    tmp = tmp_path_factory.mktemp("nginx")
    seen = []  # shared by both nodes, in the order requests arrive
    with StubNode("ingest-1", seen=seen) as n1, StubNode("ingest-2", seen=seen) as n2:
        https_port, health_port = free_port(), free_port()
        conf = nginx_test_config(tmp, [n1.port, n2.port], https_port, health_port)
        errors = (tmp / "error.log").open("w")
        proc = subprocess.Popen([nginx, "-c", str(conf), "-p", f"{tmp}/", "-e", "stderr", "-g", "daemon off;"],
                                stdout=subprocess.DEVNULL, stderr=errors)
        try:
            deadline = time.monotonic() + 15
            while True:
                assert proc.poll() is None, f"nginx exited: {(tmp / 'error.log').read_text()}"
                try:
                    socket.create_connection(("127.0.0.1", https_port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "nginx did not start listening"
                    time.sleep(0.1)
            yield {"port": https_port, "health_port": health_port, "seen": seen,
                   "cafile": tmp / "certs" / "fullchain.pem", "access_log": tmp / "access.log",
                   "error_log": tmp / "error.log"}
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            errors.close()


def tls_context(cafile, minimum=None, maximum=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1 is deprecated
        if minimum:
            ctx.minimum_version = minimum
        if maximum:
            ctx.maximum_version = maximum
    return ctx


def request(proxy, method, path, body=None, headers=None, ctx=None):
    conn = http.client.HTTPSConnection("127.0.0.1", proxy["port"], timeout=30,
                                       context=ctx or tls_context(proxy["cafile"]))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read(), conn.sock.version()
    finally:
        conn.close()


def all_seen(proxy):
    return list(proxy["seen"])


def test_proxy_forwards_with_trusted_headers(live_proxy):
    before = len(all_seen(live_proxy))
    status, headers, _, version = request(
        live_proxy, "POST", "/v1/heartbeats", b"{}",
        {"Content-Type": "application/json", "X-Forwarded-For": "203.0.113.7", "X-Real-IP": "203.0.113.7"})
    assert status == 200
    assert version == "TLSv1.3"
    assert headers.get("Strict-Transport-Security", "").startswith("max-age=")
    assert "nginx/" not in headers.get("Server", ""), "server_tokens should be off"
    seen = all_seen(live_proxy)[before:]
    assert len(seen) == 1
    got = {k.lower(): v for k, v in seen[0]["headers"].items()}
    # a client cannot choose the address the node sees: the header is replaced
    assert got["x-forwarded-for"] == "127.0.0.1"
    assert got["x-real-ip"] == "127.0.0.1"
    assert got["x-forwarded-proto"] == "https"
    assert re.fullmatch(r"[0-9a-f]{32}", got["x-request-id"])
    assert got["host"].startswith("127.0.0.1")
    assert seen[0]["path"] == "/v1/heartbeats" and seen[0]["body_len"] == 2


def test_proxy_uses_both_nodes(live_proxy):
    before = len(all_seen(live_proxy))
    for _ in range(8):
        assert request(live_proxy, "GET", "/readyz")[0] == 200
    nodes = {r["node"] for r in all_seen(live_proxy)[before:]}
    assert nodes == {"ingest-1", "ingest-2"}


def test_proxy_hides_metrics(live_proxy):
    before = len(all_seen(live_proxy))
    assert request(live_proxy, "GET", "/metrics")[0] == 404
    assert len(all_seen(live_proxy)) == before, "/metrics must not reach a node through the proxy"


def test_proxy_body_limit(live_proxy):
    limit = 16 * 1024 * 1024
    before = len(all_seen(live_proxy))
    status, *_ = request(live_proxy, "POST", "/v1/scans", b"x" * limit, {"Content-Type": "application/json"})
    assert status == 200
    assert all_seen(live_proxy)[before]["body_len"] == limit
    # one byte more is refused by the proxy from the Content-Length alone
    conn = http.client.HTTPSConnection("127.0.0.1", live_proxy["port"], timeout=30,
                                       context=tls_context(live_proxy["cafile"]))
    try:
        conn.putrequest("POST", "/v1/scans")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(limit + 1))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413
        resp.read()
    finally:
        conn.close()
    assert len(all_seen(live_proxy)) == before + 1


def test_proxy_tls_versions(live_proxy):
    ca = live_proxy["cafile"]
    assert request(live_proxy, "GET", "/healthz", ctx=tls_context(ca, maximum=ssl.TLSVersion.TLSv1_2))[3] == "TLSv1.2"
    assert request(live_proxy, "GET", "/healthz", ctx=tls_context(ca, minimum=ssl.TLSVersion.TLSv1_3))[3] == "TLSv1.3"
    old = tls_context(ca, minimum=ssl.TLSVersion.TLSv1, maximum=ssl.TLSVersion.TLSv1_1)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request(live_proxy, "GET", "/healthz", ctx=old)


def test_proxy_health_listener(live_proxy):
    conn = http.client.HTTPConnection("127.0.0.1", live_proxy["health_port"], timeout=10)
    try:
        conn.request("GET", "/nginx-health")
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
    finally:
        conn.close()


def test_proxy_access_log_is_anonymised(live_proxy):
    request(live_proxy, "GET", "/healthz", headers={"X-Forwarded-For": "203.0.113.7"})
    deadline = time.monotonic() + 5
    while True:
        lines = live_proxy["access_log"].read_text().splitlines()
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert lines, "nothing was logged"
    for line in lines:
        assert line.split()[0] == "127.0.0.0", line
        assert "127.0.0.1 " not in line and "203.0.113.7" not in line, line
    # the refused oversized body and the refused TLS 1.1 handshake left no
    # client address in the error log either
    assert "127.0.0.1" not in live_proxy["error_log"].read_text()


# --------------------------------------------------------------------------
# systemd unit
# --------------------------------------------------------------------------

def unit_directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def test_systemd_unit_hardening():
    d = unit_directives()

    def one(key):
        assert key in d, f"{key} missing"
        return d[key][-1]

    assert one("Service.DynamicUser") == "yes" or "Service.User" in d
    expected = {
        "ProtectSystem": "strict", "StateDirectory": "telemetry-ingest", "NoNewPrivileges": "yes",
        "PrivateTmp": "yes", "ProtectHome": "yes", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "MemoryDenyWriteExecute": "yes", "CapabilityBoundingSet": "", "EnvironmentFile": "/etc/telemetry-ingest/env",
        "KillSignal": "SIGTERM", "TimeoutStopSec": "30",
    }
    for key, value in expected.items():
        assert one(f"Service.{key}") == value, f"{key}={d.get('Service.' + key)}"
    assert "@system-service" in d["Service.SystemCallFilter"]
    assert one("Service.ExecStart").endswith("/telemetry-ingest serve")
    env = dict(e.split("=", 1) for e in d["Service.Environment"])
    assert env["TELEMETRY_DATA_DIR"] == "/var/lib/" + one("Service.StateDirectory")
    assert one("Install.WantedBy") == "multi-user.target"
    example = (DEPLOY / "systemd" / "env.example").read_text()
    assert re.search(r"^TELEMETRY_MASTER_KEY=$", example, re.M), "env.example must not ship a key"


def unit_test_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an existing binary (the package is
    not installed under /opt here); everything else unchanged."""
    text = UNIT.read_text()
    new, n = re.subn(r"^ExecStart=\S+", f"ExecStart={shutil.which('true') or '/bin/true'}", text, flags=re.M)
    assert n == 1
    path = tmp_path / UNIT.name
    path.write_text(new)
    return path


def test_systemd_analyze_verify(tmp_path):
    sa = need_tool("systemd-analyze")
    res = run([sa, "verify", "--man=no", str(unit_test_copy(tmp_path))])
    assert res.returncode == 0, res.stdout + res.stderr
    # unknown keys or bad values are only warnings: there must be none
    assert (res.stdout + res.stderr).strip() == "", res.stdout + res.stderr


def test_systemd_analyze_security(tmp_path):
    sa = need_tool("systemd-analyze")
    res = run([sa, "security", "--offline=true", "--no-pager", str(unit_test_copy(tmp_path))])
    if res.returncode != 0 and "offline" in (res.stderr or "") and "unrecognized" in res.stderr:
        pytest.skip("this systemd-analyze has no --offline (needs systemd >= 250)")
    assert res.returncode == 0, res.stdout + res.stderr
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", res.stdout)
    assert m, res.stdout[-2000:]
    assert float(m.group(1)) <= 2.0, f"exposure {m.group(1)} (0 best, 10 worst)\n{res.stdout}"
