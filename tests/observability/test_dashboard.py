"""The Grafana dashboard queries only metrics the gateway exports, with their real labels."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, cast

from gateway.observability.metrics import KnownModels, Metrics

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "gateway-dashboard.json"


def test_dashboard_uses_exported_metrics_and_labels() -> None:
    metrics = Metrics(KnownModels())
    exported: dict[str, set[str]] = {}
    for collector in metrics.registry._collector_to_names:
        for family in cast(Any, collector).describe():
            labels = set(getattr(collector, "_labelnames", ()))
            for suffix in ("", "_total", "_bucket", "_count", "_sum"):
                exported[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert expressions
    for expr in expressions:
        names = re.findall(r"\b(gateway_[a-z_]+)", expr)
        assert names, expr
        for name in names:
            assert name in exported, name
        for grouped in re.findall(r"by \(([^)]*)\)", expr):
            for label in (part.strip() for part in grouped.split(",")):
                assert any(label in exported[name] for name in names), (label, expr)
