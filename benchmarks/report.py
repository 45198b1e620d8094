"""Render docs/BENCHMARKS.md's rows from result JSONs, and check that the document still quotes them.

    python benchmarks/report.py benchmarks/results/fuzz_decoder.json   # print the markdown to paste
    python benchmarks/report.py --check docs/BENCHMARKS.md            # exit 1 if the doc disagrees

A figure typed by hand drifts from the run it came from; a figure rendered from the JSON cannot.
For each result that has a renderer here (the ``benchmark`` key names it), the output is a
provenance line (commit, date, load average, CPUs) followed by the table rows. ``--check``
renders every such result under ``benchmarks/results/`` and fails when a rendered line is
missing from the document (the figure was edited, or the JSON was re-measured and the doc not
updated), and when the code a result measured (``p2pdl/``, ``peers/``, ``scripts/``,
``configs/``) has changed since its commit, so that its figures need a re-run. Results written
before provenance was recorded have no renderer; the document marks those with their commit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _provenance import REPO

RESULTS = REPO / "benchmarks" / "results"
# Code whose change makes a measured figure stale (benchmarks/ itself only drives and records).
MEASURED_CODE = ("p2pdl", "peers", "scripts", "configs")
# The document's typography, spelled as escapes so that the source stays ASCII where it matters.
TIMES = "\u00d7"
EN_DASH = "\u2013"


def _load(values: list[float]) -> str:
    return "/".join(f"{value:.1f}" for value in values)


def provenance_line(document: dict[str, Any]) -> str:
    """One line: where and when the result was measured, and how busy the machine was."""
    record = document["provenance"]
    commit = (record["commit"] or "unknown")[:7]
    # Before result files were excluded from the check, a run after another in the same tree saw its JSON.
    code_dirty = [path for path in record.get("dirty_paths", []) if not path.startswith("benchmarks/results/")]
    tree = "dirty tree" if record["dirty"] and (code_dirty or not record.get("dirty_paths")) else "clean tree"
    date = record["date_utc"].replace("T", " ")[:16]
    return (
        f"Measured at commit `{commit}` ({tree}), {date} UTC, {record['cpu_count']} CPUs, load average "
        f"(1/5/15 min) {_load(record['load_average_start'])} at the start and "
        f"{_load(record['load_average_end'])} at the end; `{record['command']}`."
    )


def fuzz_rows(document: dict[str, Any]) -> list[str]:
    outcomes = dict(document["outcomes"])
    accepted = outcomes.pop("accepted", 0)
    refused = " · ".join(f"{reason} {count:,}" for reason, count in sorted(outcomes.items(), key=lambda kv: -kv[1]))
    failures = document["failures"]
    return [
        "| cases | time | cases/s | unexpected exceptions | accepted | refused by reason |",
        "|---:|---:|---:|---:|---:|---|",
        f"| {document['cases']:,} | {document['seconds']:.2f} s | {document['cases_per_second']:,.0f} | "
        f"**{failures}** | {accepted:,} | {refused} |",
    ]


DEMO_HEADER = [
    f"| config | peers {TIMES} steps | mean test accuracy | per-peer range | consensus distance "
    "| MB sent per peer (mean) | wall time | exit |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
]


def demo_row(document: dict[str, Any]) -> str:
    """One cluster run (benchmarks/demo.py) as a table row; several configs share :data:`DEMO_HEADER`."""
    peers = document["peers"]
    accuracies = [p["test_accuracy"] for p in peers if p["test_accuracy"] is not None]
    spread = f"{min(accuracies):.4f}{EN_DASH}{max(accuracies):.4f}" if accuracies else "\u2014"
    sent = [p["bytes_sent"] for p in peers if p["bytes_sent"] is not None]
    mean_sent = f"{statistics.mean(sent) / 1e6:.1f}" if sent else "\u2014"
    distance = document["final_consensus_distance"]
    distance_text = f"{distance:.1e}" if distance is not None else "\u2014"
    mean_accuracy = document["mean_test_accuracy"]
    # A failed run stays in the table: its exit status is the figure.
    accuracy_text = f"**{mean_accuracy:.4f}**" if mean_accuracy is not None else "\u2014"
    exit_code = document["local_cluster_exit_code"]
    return (
        f"| `{document['config']}` | {len(peers)} {TIMES} {document['steps']} | "
        f"{accuracy_text} | {spread} | {distance_text} | {mean_sent} | "
        f"{document['wall_seconds']:.1f} s | {exit_code if exit_code == 0 else f'**{exit_code}** (failed)'} |"
    )


def demo_rows(document: dict[str, Any]) -> list[str]:
    return [*DEMO_HEADER, demo_row(document)]


# The phases of rank 0's instrumented p2pdl rounds (exchange.py's breakdown), in round order.
EXCHANGE_PHASES = (
    ("compute:flatten", "flatten"),
    ("encode(await)", "encode"),
    ("send(await)", "sends (await, summed)"),
    ("decode(codec thread)", "decode (summed)"),
    ("compute:reduce(exact_mean)", "exact mean"),
    ("compute:assemble(unflatten_chunks)", "assemble"),
)


def exchange_rows(document: dict[str, Any]) -> list[str]:
    pieces = next((e["pipeline_pieces"] for e in document["by_world"].values() if "pipeline_pieces" in e), None)
    piece_header = f" p2pdl, {pieces} pieces | pieces / gloo | pieces / one piece |" if pieces else ""
    rows = [
        "| processes | gloo median | gloo + bucket copies | p2pdl median | p2pdl / gloo | p2pdl / (gloo + copies) "
        "| bit-exact |" + piece_header,
        "|---:|---:|---:|---:|---:|---:|---|" + ("---:|---:|---:|" if pieces else ""),
    ]
    phases = [
        "",
        "| processes | " + " | ".join(f"{label} ms" for _, label in EXCHANGE_PHASES) + " |",
        "|---:|" + "---:|" * len(EXCHANGE_PHASES),
    ]
    for world, entry in document["by_world"].items():
        exact = "yes" if all(entry.get("p2pdl_bit_exact_vs_mean", [False])) else "**no**"
        if pieces:
            exact += "; pieces: " + ("yes" if all(entry.get("p2pdl_pipeline_bit_exact_vs_mean", [False])) else "**no**")
        piece_cells = (
            f" {entry['p2pdl_pipeline']['median_ms']:.1f} ms | **{entry['ratio_p2pdl_pipeline_over_gloo_median']:.2f}"
            f"{TIMES}** | {entry['ratio_p2pdl_pipeline_over_p2pdl_median']:.2f}{TIMES} |"
            if pieces
            else ""
        )
        rows.append(
            f"| {world} | {entry['gloo']['median_ms']:.1f} ms | {entry['gloo_ddp']['median_ms']:.1f} ms | "
            f"{entry['p2pdl']['median_ms']:.1f} ms | **{entry['ratio_p2pdl_over_gloo_median']:.2f}{TIMES}** | "
            f"{entry['ratio_p2pdl_over_gloo_ddp_median']:.2f}{TIMES} | {exact} |" + piece_cells
        )
        means = entry.get("breakdown_rank0_dialer", {}).get("mean_ms_per_round_by_label", {})
        if means:
            cells = " | ".join(f"{means[key]:.1f}" if key in means else "\u2014" for key, _ in EXCHANGE_PHASES)
            phases.append(f"| {world} | {cells} |")
    return rows + phases if len(phases) > 3 else rows


def consensus_rows(document: dict[str, Any]) -> list[str]:
    rows = [
        "| topology | λ₂ | measured rate | relative error | mean drift | partial rounds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in document["results"]:
        rows.append(
            f"| {r['topology']} | {r['lambda2']:.4f} | {r['measured_rate']:.4f} | {r['relative_error']:+.2%} | "
            f"{r['max_mean_drift_relative']:.1e} | {r['partial_rounds']} |"
        )
    return rows


def diloco_rows(document: dict[str, Any]) -> list[str]:
    rows = [
        "| inner lr | inner momentum | outer lr | outer momentum | test accuracy (peer 0) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in document["rows"]:
        rows.append(
            f"| {r['inner_lr']} | {r['inner_momentum']} | {r['outer_lr']} | {r['outer_momentum']} | "
            f"{r['peer0_test_accuracy']:.3f} |"
        )
    return rows


def robust_rows(document: dict[str, Any]) -> list[str]:
    rows = [
        "| topology | rule | radius | attacker | honest accuracy: min | median | max |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in document["rows"]:
        accuracies = r["honest_test_accuracies"]
        radius = "per round" if r["radius"] == 0 else f"{r['radius']:g}"
        rows.append(
            f"| {r['topology']} | {r['rule']} | {radius if r['rule'] == 'clip' else '—'} | "
            f"{'yes' if r['attack'] else 'no'} | {min(accuracies):.3f} | {statistics.median(accuracies):.3f} | "
            f"{max(accuracies):.3f} |"
        )
    return rows


def detection_rows(document: dict[str, Any]) -> list[str]:
    rows = [
        "| signal | busy loops | time until the survivors declare the peer dead: min | max | false deaths |",
        "|---|---:|---:|---:|---:|",
    ]
    for case in document["cases"]:
        latencies = list(case["latency_seconds"].values())
        rows.append(
            f"| {case['signal']} | {case['busy_loops']} | {min(latencies):.2f} s | {max(latencies):.2f} s | "
            f"{case['false_deaths']} |"
        )
    return rows


def conflicts_note(identity: dict[str, Any]) -> str:
    """Rounds two peers applied over different groups (recorded since the decision, §11.4)."""
    if "conflicting_rounds" not in identity or identity["conflicting_rounds"] is None:
        return ""
    rounds = identity["conflicting_rounds"]
    return f"; rounds applied over two groups: {rounds}" if rounds else "; no round applied over two groups"


def chaos_rows(document: dict[str, Any]) -> list[str]:
    rows = [
        "| strategy | goodput, chaos / failure-free | final val loss: failure-free, chaos (difference) "
        "| longest global stall (target) | median step | bit-identical at every snapshot step | events |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in document["rows"]:
        clean, chaos = r["clean"], r["chaos"]
        identity = chaos["identity"]
        difference = r.get("final_loss_vs_clean")
        rows.append(
            f"| {r['strategy']} | {r.get('goodput_ratio')} | {clean['final_test_loss']:.4f}, "
            f"{chaos['final_test_loss']:.4f} ({difference:+.2%}) | {chaos['longest_stall_seconds']} s "
            f"({r.get('stall_target_seconds')} s) | {chaos['median_step_seconds']} s | "
            f"{'yes' if identity['always_identical'] else 'NO'} ({identity['steps_compared']} steps compared"
            f"{', differing at ' + str(identity['steps_differing']) if identity['steps_differing'] else ''}"
            f"{conflicts_note(identity)}) | "
            f"{len(chaos['events'])} |"
        )
    measured = [r for r in document["rows"] if "detection" in r["chaos"]]
    if measured:
        rows += [
            "",
            "| strategy | freezes declared dead | freeze detection, first survivor: median, max "
            "| kills declared dead | kill detection, first survivor: median, max "
            "| longest stall (target with the slowest freeze detection) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in measured:
            detection, chaos = r["chaos"]["detection"], r["chaos"]
            cells = []
            for kind in ("freeze", "restart"):
                figures = detection[kind]
                cells.append(f"{figures['declared']} of {figures['events']}")
                cells.append(
                    f"{figures['first_median_seconds']} s, {figures['first_max_seconds']} s"
                    if figures["declared"]
                    else "—"
                )
            rows.append(
                f"| {r['strategy']} | {' | '.join(cells)} | {chaos['longest_stall_seconds']} s "
                f"({r.get('stall_target_measured_seconds', '—')} s) |"
            )
    return rows


def own_table(document: dict[str, Any]) -> list[str]:
    """The markdown table the benchmark script rendered itself (its ``table`` key)."""
    return list(document["table"].splitlines())


def setting_tables(document: dict[str, Any]) -> list[str]:
    """Each setting's tables as the strategies runner rendered them (``table``, ``extra_table``)."""
    lines: list[str] = []
    for table in document["tables"].values():
        lines += [*table["table"].splitlines(), ""]
        if "extra_table" in table:
            lines += [*table["extra_table"].splitlines(), ""]
    return lines[:-1]


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "time_to_accuracy": own_table,
    "compressors": own_table,
    "gpt_peers": own_table,
    "streaming_diloco": own_table,
    "gossip_delay": own_table,
    "overlap_allreduce": own_table,
    "fuzz_decoder": fuzz_rows,
    "demo": demo_rows,
    "exchange": exchange_rows,
    "consensus": consensus_rows,
    "diloco_outer": diloco_rows,
    "robust_mixing": robust_rows,
    "detection": detection_rows,
    "chaos": chaos_rows,
    "compression_rs": setting_tables,
}


def render(document: dict[str, Any]) -> list[str] | None:
    """The provenance line and table rows of a result, or None when it has no renderer or no provenance."""
    renderer = RENDERERS.get(document.get("benchmark", ""))
    if renderer is None or "provenance" not in document:
        return None
    return [provenance_line(document), "", *renderer(document)]


def changed_since(commit: str) -> list[str]:
    """Files of the measured code that differ between ``commit`` and the working tree."""
    try:
        completed = subprocess.run(
            ["git", "diff", "--name-only", commit, "--", *MEASURED_CODE],
            cwd=REPO, capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return [f"(cannot diff against {commit})"]
    return completed.stdout.split()


def check(doc: Path) -> int:
    """Exit status 1 when the document misses a rendered line or a result measured code since changed."""
    text = doc.read_text()
    problems = []
    for path in sorted(RESULTS.glob("*.json")):
        document = json.loads(path.read_text())
        lines = render(document)
        if lines is None:
            continue
        missing = [line for line in lines if line and line not in text]
        problems += [f"{path.name}: not in {doc.name}: {line}" for line in missing]
        commit = document["provenance"]["commit"]
        stale = changed_since(commit) if commit else ["(no commit recorded)"]
        if stale:
            problems.append(f"{path.name}: measured at {str(commit)[:7]}; changed since: {', '.join(stale[:8])}")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="*", help="result JSONs to render")
    parser.add_argument("--check", type=Path, metavar="DOC", help="check DOC against every renderable result")
    args = parser.parse_args(argv)
    if args.check is not None:
        return check(args.check)
    documents = [json.loads(path.read_text()) for path in args.results]
    if len(documents) > 1 and all(d.get("benchmark") == "demo" and "provenance" in d for d in documents):
        # Several cluster runs: one table, each run's provenance line above it in row order.
        lines = [f"{n}. {provenance_line(d)}" for n, d in enumerate(documents, 1)]
        print("\n".join([*lines, "", *DEMO_HEADER, *map(demo_row, documents)]) + "\n")
        return 0
    for path, document in zip(args.results, documents, strict=True):
        rendered = render(document)
        if rendered is None:
            print(f"{path}: no renderer for it, or written before provenance was recorded", file=sys.stderr)
            return 1
        print("\n".join(rendered) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
