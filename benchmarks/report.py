"""The benchmark report: Markdown tables, the targets as measured ratios, PNG charts."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.run import Point, Results

SCENARIO_TITLES = {
    "web": "Web requests, one hot sequence (get a number, 5 ms of work in the document's "
    "transaction, insert the document)",
    "bare": "Bare enqueue-and-await (a number and nothing else)",
}


def _systems(results: Results, scenario: str) -> list[str]:
    seen: list[str] = []
    for point in results.points:
        if point.scenario == scenario and point.system not in seen:
            seen.append(point.system)
    return seen


def _table(results: Results, scenario: str) -> list[str]:
    lines = [
        "| system | requesters | numbers/s | p50 ms | p99 ms | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for system in _systems(results, scenario):
        for p in results.points:
            if p.scenario == scenario and p.system == system:
                lines.append(
                    f"| {system} | {p.concurrency} | {p.throughput:,.0f} | {p.p50_ms:.1f} | "
                    f"{p.p99_ms:.1f} | {p.errors} |"
                )
    return lines


def _chart(results: Results, scenario: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in _systems(results, scenario):
        points = [p for p in results.points if p.scenario == scenario and p.system == system]
        xs = [p.concurrency for p in points]
        (line,) = left.plot(xs, [p.throughput for p in points], marker="o", label=system)
        right.plot(xs, [p.p99_ms for p in points], marker="o", color=line.get_color())
        right.plot(
            xs, [p.p50_ms for p in points], marker=".", linestyle=":", color=line.get_color()
        )
    for axis, label in ((left, "numbers/s"), (right, "latency ms (p99 solid, p50 dotted)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent requesters (processes)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle(SCENARIO_TITLES[scenario].split(" (")[0])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _target_row(name: str, measured: float | None, target: str, ok: bool | None) -> str:
    shown = "n/a" if measured is None else f"{measured:.2f}"
    verdict = "not measured" if ok is None else ("met" if ok else "**missed**")
    return f"| {name} | {shown} | {target} | {verdict} |"


def _targets(results: Results) -> list[str]:
    def get(scenario: str, system: str, concurrency: int) -> Point | None:
        return results.point(scenario, system, concurrency)

    web_nb, web_dj = get("web", "numbering (redis)", 16), get("web", "django-sequences", 16)
    bare_nb, bare_dj = get("bare", "numbering (redis)", 16), get("bare", "django-sequences", 16)
    bare_celery = get("bare", "Celery no-op round trip", 16)
    one_nb, one_celery = (
        get("bare", "numbering (redis)", 1),
        get("bare", "Celery no-op round trip", 1),
    )
    many = next((p for p in results.points if p.scenario == "many"), None)

    rows: list[str] = []

    def target(name: str, value: float | None, wanted: str, at_least: bool, bound: float) -> None:
        ok = None if value is None else (value >= bound if at_least else value <= bound)
        rows.append(_target_row(name, value, wanted, ok))

    def attr(point: Point | None, name: str) -> float | None:
        return None if point is None else float(getattr(point, name))

    target(
        "web x16: numbering / django-sequences, numbers/s",
        _ratio(attr(web_nb, "throughput"), attr(web_dj, "throughput")),
        ">= 8",
        True,
        8,
    )
    target(
        "web x16: numbering p99 / django-sequences p99",
        _ratio(attr(web_nb, "p99_ms"), attr(web_dj, "p99_ms")),
        "<= 0.10",
        False,
        0.1,
    )
    web_dropin = get("web", "numbering.django drop-in", 16)
    target(
        "web x16: numbering.django drop-in / django-sequences, numbers/s (lock time no worse)",
        _ratio(attr(web_dropin, "throughput"), attr(web_dj, "throughput")),
        ">= 1",
        True,
        1,
    )
    target(
        "bare x16: numbering / django-sequences, numbers/s",
        _ratio(attr(bare_nb, "throughput"), attr(bare_dj, "throughput")),
        ">= 2",
        True,
        2,
    )
    target(
        "bare x16: numbering / Celery no-op round trip, numbers/s",
        _ratio(attr(bare_nb, "throughput"), attr(bare_celery, "throughput")),
        ">= 5",
        True,
        5,
    )
    target(
        "bare x1: numbering p50 / Celery no-op round trip p50",
        _ratio(attr(one_nb, "p50_ms"), attr(one_celery, "p50_ms")),
        "<= 1",
        False,
        1,
    )
    if results.batch:
        big = max(results.batch, key=lambda b: b["rows"])
        small = min(results.batch, key=lambda b: b["rows"])
        target(
            f"batch {big['rows']:,} rows: numbering / set-based UPDATE, median rows/s",
            big["numbering_rows_s"] / big["ceiling_rows_s"],
            ">= 0.8",
            True,
            0.8,
        )
        target(
            f"batch peak memory: {big['rows']:,} rows / {small['rows']:,} rows",
            big["numbering_peak_mib"] / small["numbering_peak_mib"],
            "flat (<= 1.2)",
            False,
            1.2,
        )
    if many:
        single = get("bare", "numbering (redis)", many.concurrency)
        target(
            f"many sequences x{many.concurrency}: aggregate / one sequence, numbers/s",
            _ratio(many.throughput, attr(single, "throughput")),
            ">= 0.9",
            True,
            0.9,
        )
    if len(results.growth) == 2:
        first, last = results.growth
        target(
            f"cost per number at {last['ledger_rows']:,} ledger rows / at {first['ledger_rows']:,}",
            last["ms_per_number"] / first["ms_per_number"],
            "<= 1.2",
            False,
            1.2,
        )
    return ["| target | measured | wanted | |", "| --- | ---: | --- | --- |", *rows]


def render(results: Results, args: argparse.Namespace, machine: str, output: Path) -> str:
    today = dt.date.today().isoformat()
    out = [
        "# Benchmarks",
        "",
        f"Measured {today} on {machine}, with PostgreSQL, Redis and RabbitMQ on the same "
        "machine (loopback), by `make bench` (`python -m benchmarks.run`). Every figure in a "
        "table comes from the same run; requesters are separate processes; each point is "
        f"the median of {args.repeats} measurement(s) of {args.duration:g} s after "
        f"{args.warmup:g} s of warm-up, the systems taking turns (numbers/s, p50 and p99 "
        "each the median of their own).",
        "",
        "Re-run: `make bench` (about 18 minutes on 2 cores; "
        "`python -m benchmarks.run --help` for sizes and repeats). Where the CPU goes per "
        "number: `make bench-cpu`; what numbering's own transaction costs around its SQL: "
        "`make bench-overhead`.",
        "",
        "## Targets",
        "",
        *_targets(results),
        "",
    ]
    for scenario in ("web", "bare"):
        if not any(p.scenario == scenario for p in results.points):
            continue
        chart = output.with_name(f"benchmarks-{scenario}.png")
        out += [f"## {SCENARIO_TITLES[scenario]}", ""]
        if _chart(results, scenario, chart):
            out += [f"![{scenario}]({chart.name})", ""]
        out += [*_table(results, scenario), ""]
    many = [p for p in results.points if p.scenario == "many"]
    if many:
        out += [
            f"## Many sequences ({results.many['sequences']} sequences over "
            f"{results.many['shards']} shards, served by {results.many['workers']} worker "
            f"{'process' if results.many['workers'] == 1 else 'processes'})",
            "",
            *_table(results, "many"),
            "",
        ]
    if any(p.scenario == "fleet" for p in results.points):
        out += [
            f"## Worker fleet ({results.fleet['sequences']} sequences over "
            f"{results.fleet['shards']} shards, Redis)",
            "",
            "One process serving every shard queue (`--shard I/K` repeated), then fleets of "
            "worker processes started with `--shards K`, each measured once the queues were "
            "spread over every member.",
            "",
            *_table(results, "fleet"),
            "",
        ]
    if results.batch:
        out += [
            f"## Batch numbering ({args.chunk_size:,}-row chunks)",
            "",
            "Each size is run several times on fresh tables, the two contenders taking turns to "
            "go first after a CHECKPOINT; rows/s is the median, peak memory the highest.",
            "",
            "| rows | runs | numbering batch rows/s | peak MiB | set-based UPDATE rows/s | "
            "peak MiB | every run: numbering / set-based UPDATE |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for b in results.batch:
            each = ", ".join(
                f"{n / 1000:,.0f}k / {c / 1000:,.0f}k"
                for n, c in zip(b["numbering_all"], b["ceiling_all"], strict=True)
            )
            out.append(
                f"| {b['rows']:,} | {b['runs']} | {b['numbering_rows_s']:,.0f} | "
                f"{b['numbering_peak_mib']:.0f} | {b['ceiling_rows_s']:,.0f} | "
                f"{b['ceiling_peak_mib']:.0f} | {each} |"
            )
        out.append("")
    if results.growth:
        out += [
            "## Growth (numbering's own transaction, in process, one number at a time)",
            "",
            "Two databases, one with the benchmark's own ledger and one with `--growth-rows` rows "
            "more, measured in turns in the same minutes; ms per number is the median.",
            "",
            "| ledger rows | ms per number | every measurement, ms |",
            "| ---: | ---: | --- |",
            *(
                f"| {g['ledger_rows']:,} | {g['ms_per_number']:.3f} | "
                f"{', '.join(f'{ms:.2f}' for ms in g.get('runs', []))} |"
                for g in results.growth
            ),
            "",
        ]
    out += [
        "## Audit at the end of the run",
        "",
        *(f"- {line}" for line in results.audit),
        "",
        "Result: "
        + ("every ledger gapless." if not results.failures else "; ".join(results.failures)),
        "",
    ]
    return "\n".join(out)
