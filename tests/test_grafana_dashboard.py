"""docs/grafana-dashboard.json queries only metrics that kvtier exports, with their real types."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kvtier.metrics import SPECS

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json"


def test_dashboard_metrics_exist() -> None:
    body = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in body["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"kvtier:([a-z0-9_]+)", e)}
    assert len(names) > 20
    for name in names:
        if name.endswith("_total"):
            assert SPECS[name.removesuffix("_total")].kind == "counter", name
        elif name.endswith("_bucket"):
            assert SPECS[name.removesuffix("_bucket")].kind == "histogram", name
        else:
            assert SPECS[name].kind == "gauge", name
    for e in exprs:  # every selector filters by the dashboard's job and model_name variables
        for selector in re.findall(r"kvtier:[a-z0-9_]+\{([^}]*)\}", e):
            assert 'job=~"$job"' in selector and 'model_name=~"$model_name"' in selector, e
    variables = {v["name"] for v in body["templating"]["list"]}
    assert {"job", "model_name"} <= variables
    for e in exprs:  # counters are read through rate() or increase(), never raw
        for counter in re.findall(r"kvtier:[a-z0-9_]+_total\{[^}]*\}", e):
            assert re.search(r"(rate|increase)\(" + re.escape(counter), e), e
