"""``kvtier bench serve --stages``: where a launched server's TTFT goes, stage by stage.

Each launched server runs with ``--trace-stages``; after its timed run the bench reads
``GET /debug/stages`` and joins each record (by the completion id of the stream's chunks) with the
client's own two stamps: sent and first chunk parsed. One clock for all (kvtier/server/stages.py).
A stage's time is the gap from the stamp before it that the record has; the table shows the median
and p90 over the requests whose system prompt was cached, so the stages add up to about the TTFT
(medians of parts need not add up exactly).
"""

from __future__ import annotations

import statistics
from typing import Any

from kvtier.server.stages import STAGE_NAMES


def join(samples: list[Any], body: dict[str, Any]) -> None:
    """Give each sample its server record (``body``: GET /debug/stages), with the client's stamps at
    both ends and the ms of each process's gen-2 collections inside its TTFT (in place)."""
    by_id = {r["id"]: r for r in body["records"]}
    for s in samples:
        record = by_id.get(s.request_id)
        if record is None or s.error:
            continue
        stamps = {k: v for k, v in record.items() if k != "id"}
        s.stages = {"client_sent": s.start, **stamps, "client_first": s.start + s.ttft}
        if s.written_at:
            s.stages["client_written"] = s.written_at
    add_gc_pauses(samples, body.get("gc_pauses", {}))


def add_gc_pauses(samples: list[Any], pauses: dict[str, list[tuple[float, float]]]) -> None:
    """Each staged sample: ``gc_<process>_ms``, how much of its TTFT that process spent in full
    garbage collections (``pauses``: process -> (start, ms) spans)."""
    for s in samples:
        if s.stages is not None:
            for where, spans in pauses.items():
                s.stages[f"gc_{where}_ms"] = _overlap(spans, s.start, s.start + s.ttft)


def _overlap(spans: list[tuple[float, float]], begin: float, end: float) -> float:
    """ms of the (start, ms) spans inside [begin, end]."""
    return sum(
        max(0.0, min(end, t + ms / 1e3) - max(begin, t)) * 1e3
        for t, ms in spans
        if t < end and t + ms / 1e3 > begin
    )


def gaps(stamps: dict[str, float]) -> dict[str, float]:
    """Each stage's time in ms: from the stamp before it (that this record has) to its own."""
    out: dict[str, float] = {}
    last: float | None = None
    for name in STAGE_NAMES:
        at = stamps.get(name)
        if at is None:
            continue
        if last is not None:
            out[name] = (at - last) * 1e3
        last = at
    return out


def summarize(samples: list[Any]) -> dict[str, Any] | None:
    """Per group of cached requests with a record (a chat's first turn: it may open a connection, and
    the first turns of the first chats arrive at once; later turns: one at a time, as chats go on):
    median / p90 / mean ms of each stage. None if no request has a record."""
    rows = [s for s in samples if s.stages and s.cached_tokens * 2 >= s.prompt_tokens]
    if not rows:
        return None
    groups = {"first turns": [s for s in rows if s.turn == 0], "later turns": [s for s in rows if s.turn > 0]}
    return {name: _group(group) for name, group in groups.items() if group}


def _group(rows: list[Any]) -> dict[str, Any]:
    from kvtier.bench.serve import percentile

    per = [gaps(s.stages) for s in rows]
    stages: dict[str, dict[str, float]] = {}
    for name in STAGE_NAMES:
        values = [g[name] for g in per if name in g]
        if values:
            stages[name] = {
                "p50": percentile(values, 50),
                "p90": percentile(values, 90),
                "mean": statistics.fmean(values),
            }
    steps = [s.stages["steps"] for s in rows if "steps" in s.stages]
    for where in ("http", "engine"):
        values = [s.stages[f"gc_{where}_ms"] for s in rows if f"gc_{where}_ms" in s.stages]
        if values:
            stages[f"gc_{where}"] = {
                "p50": percentile(values, 50),
                "p90": percentile(values, 90),
                "mean": statistics.fmean(values),
                "share": sum(v > 0 for v in values) / len(values),
            }
    return {
        "requests": len(rows),
        "stages": stages,
        "engine_steps_p50": statistics.median(steps) if steps else None,
        "ttft_p50_ms": percentile([s.ttft * 1e3 for s in rows], 50),
    }


def table(body: dict[str, Any]) -> Any:
    """A rich table: one row per stage, one column per run and group; see kvtier/server/stages.py for
    what each stamp is."""
    from rich.table import Table

    cols = {
        f"{name}: {group}": g
        for name, r in body["runs"].items()
        for group, g in (r.get("stages") or {}).items()
    }
    if not cols:
        return None
    t = Table(title="TTFT by stage, requests with a cached system prompt: p50 (p90) ms")
    t.add_column("stage: gap to its stamp")
    for name in cols:
        t.add_column(name, justify="right")
    for name in STAGE_NAMES[1:]:
        if any(name in g["stages"] for g in cols.values()):
            cells = [_cell(g["stages"].get(name)) for g in cols.values()]
            t.add_row(name, *cells)
    for where in ("http", "engine"):
        if any(f"gc_{where}" in g["stages"] for g in cols.values()):
            cells = [_gc_cell(g["stages"].get(f"gc_{where}")) for g in cols.values()]
            t.add_row(f"in it: {where} process GC, mean ms (hit)", *cells)
    t.add_row("step() calls, add -> 1st token", *(f"{g['engine_steps_p50']}" for g in cols.values()))
    t.add_row("TTFT p50 (requests)", *(f"{g['ttft_p50_ms']:.1f} ({g['requests']})" for g in cols.values()))
    return t


def _gc_cell(v: dict[str, float] | None) -> str:
    return "-" if v is None else f"{v['mean']:.1f} ({v['share']:.0%})"


def _cell(v: dict[str, float] | None) -> str:
    return "-" if v is None else f"{v['p50']:.1f} ({v['p90']:.1f})"
