"""The markdown tables of docs/RESULTS.md's "Text stream" and "Relative against absolute
threshold" sections, from the run folders docs/results_text.sh writes.

Reads the per-cell files (``cells/<benchmark>/<method>/seed<k>.json``) rather than each run's
results.json, so a run that did not finish contributes the cells it finished (the table's n
says how many). Usage: python docs/results_text_tables.py [OUT]   (default runs/results-text)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean, stdev

from classp_fused.cl.report import TABLE_HEADER, aggregate, markdown_table

TEXT = "synthetic-sentiment"
TAUS = ("0.5", "1", "2")
#: The row order of docs/RESULTS.md's tables.
ORDER = ("sgd", "adagrad", "classp", "ewc", "online-ewc", "mas", "classp+mas")


def cells(run: Path, seeds=None, method: str = "*") -> list[dict]:
    """The finished cells under ``run`` (only ``seeds`` where given), in seed order."""
    found = [json.loads(p.read_text())
             for p in sorted(run.glob(f"cells/*/{method}/seed*.json"))]
    found = [c for c in found if seeds is None or c["seed"] in seeds]
    return sorted(found, key=lambda c: (ORDER.index(c["method"]), c["seed"]))


def rows(run: Path, label=None, method: str = "*") -> list[str]:
    """The run's table rows (header dropped), the method column relabelled to ``label``."""
    found = cells(run, method=method)
    if not found:
        return []
    results = aggregate(found)
    lines = markdown_table(results).splitlines()[2:]
    if label is not None:
        lines = [line.replace(f"| {found[0]['method']} |", f"| {label} |", 1) for line in lines]
    return lines


def comparison(out: Path) -> None:
    for scenario in ("task", "class"):
        print(f"\n{scenario}-incremental\n\n{TABLE_HEADER}\n|" + "---|" * 12)
        print("\n".join(rows(out / "eval" / f"{TEXT}-{scenario}")))
    print(f"\nablation\n\n{TABLE_HEADER}\n|" + "---|" * 12)
    tuned = out / "eval" / f"{TEXT}-task"
    print("\n".join(rows(tuned, "classp (tuned)", method="classp")))
    for variant in sorted((out / "ablation" / TEXT).glob("*")):
        print("\n".join(rows(variant, f"classp: {variant.name}")))


def _stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{mean(values):.3f} ± {stdev(values) if len(values) > 1 else 0.0:.3f}"


def tau_row(stream: str, setting: str, run: Path, seeds) -> dict:
    """One setting's figures over ``seeds`` (finished ones; diverged ones counted apart)."""
    found = cells(run, seeds, method="classp")
    finished = [c for c in found if not c["diverged"]]
    summary = aggregate(finished)[finished[0]["benchmark"]]["methods"]["classp"] if finished \
        else None
    density = [sum(c["update_density"]) / len(c["update_density"]) for c in finished]
    return {"stream": stream, "setting": setting, "n": len(finished),
            "diverged": len(found) - len(finished),
            "acc": summary["avg_acc"]["per_seed"] if summary else [],
            "forgetting": summary["forgetting"]["per_seed"] if summary else [],
            "own": summary["own_acc"]["per_seed"] if summary else [], "density": density}


def tau_table(out: Path) -> None:
    eval_task = out / "eval" / f"{TEXT}-task"
    tuned_threshold = None
    tuned_path = out / "tune" / f"{TEXT}-task" / "tuned.json"
    if tuned_path.exists():
        tuned_threshold = json.loads(tuned_path.read_text())["hparams"]["classp"]["threshold"]
    streams = {}
    for stream in ("split-digits", "permuted-digits"):
        base = out / "tau" / stream
        streams[stream] = [("threshold 0", base / "threshold-0"),
                           ("threshold 1e-4", base / "threshold-1e-4")]
    if tuned_threshold is not None:
        other = "1e-4" if tuned_threshold == 0.0 else "0"
        mine = "0" if tuned_threshold == 0.0 else "1e-4"
        streams[TEXT] = sorted([(f"threshold {mine}", eval_task),
                                (f"threshold {other}",
                                 out / "ablation" / TEXT / f"threshold-{other}")])
    print("\n| stream | setting | n | avg acc | forgetting | own-task acc | update density"
          " | avg acc − best absolute | diverged |\n|" + "---|" * 9)
    for stream, absolute in streams.items():
        taus = [(f"threshold 0, tau {tau}", out / "tau" / stream / f"tau-{tau}") for tau in TAUS]
        # every row over the seeds the relative runs used (the absolute runs may have more)
        seeds = {c["seed"] for _, run in taus for c in cells(run)} or None
        table = [tau_row(stream, name, run, seeds) for name, run in absolute + taus]
        best = max((mean(r["acc"]) for r in table[:len(absolute)] if r["acc"]), default=None)
        for r in table:
            gap = f"{mean(r['acc']) - best:+.3f}" if r["acc"] and best is not None else "n/a"
            print(f"| {r['stream']} | {r['setting']} | {r['n']} | {_stats(r['acc'])} |"
                  f" {_stats(r['forgetting'])} | {_stats(r['own'])} | {_stats(r['density'])} |"
                  f" {gap} | {r['diverged'] or '—'} |")


def main(argv: list[str]) -> None:
    out = Path(argv[0] if argv else "runs/results-text")
    comparison(out)
    tau_table(out)


if __name__ == "__main__":
    main(sys.argv[1:])
