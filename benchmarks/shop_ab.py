"""A/B of the shop's CPU and latency between two commits, run interleaved so the machine's drift cancels.

    .venv/bin/python -m benchmarks.shop_ab --base 3015685              # 3 pairs: base, head, base, head, ...
    .venv/bin/python -m benchmarks.shop_ab --base main~3 --pairs 5 --out /tmp/ab

On a shared machine the same commit measures 20-30 % apart from one hour to the next, more than most
changes are worth, so two runs an hour apart compare nothing. Here the base (a temporary git worktree of
``--base``, run with ``PYTHONPATH`` on it) and the head (this checkout, as it is on disk) take turns:
each run is ``python -m benchmarks.shop_cpu`` (a fresh shop; a backlog drain, then the steady point),
and the report gives, per figure, the median of each side with every run's value beside it, and each
window's hypervisor steal: a pair whose steal differs a lot compares the host's other guests, not the code. The base
must be recent enough to have ``benchmarks/shop_cpu.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
SIDES = ("base", "head")

Figure = tuple[str, Callable[[dict[str, Any]], float]]


def figures(roles: Sequence[str]) -> list[Figure]:
    """What the report compares: CPU per order by role at the steady point and in the backlog, the
    steady point's latency, the drain's rate."""
    found: list[Figure] = [
        ("steady: CPU ms per order, all processes", lambda r: r["steady"]["cpu_ms_per_order"]["total"]),
        ("steady: p50 placed → ended, ms", lambda r: r["steady_summary"]["p50_ms"]),
        ("steady: p99 placed → ended, ms", lambda r: r["steady_summary"]["p99_ms"]),
        ("backlog: orders/s", lambda r: r["backlog"]["ended_per_s"]),
        ("backlog: CPU ms per order, all processes", lambda r: r["backlog"]["cpu_ms_per_order"]["total"]),
        ("steady: hypervisor steal, % of vCPU time", _steal("steady")),
        ("backlog: hypervisor steal, % of vCPU time", _steal("backlog")),
        ("the machine's speed before the run, µs per reference round", _speed("before")),
        ("the machine's speed after the run, µs per reference round", _speed("after")),
    ]
    for phase in ("steady", "backlog"):
        found += [(f"{phase}: {role}", _role(phase, role)) for role in roles if role != "total"]
    return found


def _steal(phase: str) -> Callable[[dict[str, Any]], float]:
    """The window's steal in percent; NaN from a base too old to record it."""
    def get(r: dict[str, Any]) -> float:
        share = r[phase].get("steal_share")
        return float("nan") if share is None else share * 100
    return get


def _speed(when: str) -> Callable[[dict[str, Any]], float]:
    """:func:`benchmarks.proc_stats.reference_speed` before or after the run; NaN from an older base."""
    def get(r: dict[str, Any]) -> float:
        us = r.get("run", {}).get("speed_before_us") if when == "before" else r.get("load_after", {}).get("speed_us")
        return float("nan") if us is None else float(us)
    return get


def _role(phase: str, role: str) -> Callable[[dict[str, Any]], float]:
    return lambda r: float(r[phase]["cpu_ms_per_order"].get(role, float("nan")))


def table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: each figure's median per side, the change, and every run's value."""
    roles = list(dict.fromkeys(role for side in SIDES for r in runs[side] for role in r["steady"]["cpu_ms_per_order"]))
    lines = ["| figure | base | head | change | base runs | head runs |", "|---|---:|---:|---:|---|---|"]
    for label, get in figures(roles):
        values = {side: [float(get(r)) for r in runs[side]] for side in SIDES}
        base, head = (_median(values[side]) for side in SIDES)
        change = f"{(head - base) / base * 100:+.0f} %" if base and not math.isnan(base - head) else "-"
        lines.append(f"| {label} | {_cell(base)} | {_cell(head)} | {change} | "
                     + " | ".join(", ".join(_cell(v) for v in values[side]) for side in SIDES) + " |")
    return "\n".join(lines)


def _median(values: list[float]) -> float:
    known = [v for v in values if not math.isnan(v)]
    return statistics.median(known) if known else float("nan")


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def commit_of(rev: str) -> str:
    """The full commit ``rev`` names in this repository."""
    done = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"--base {rev!r}: not a commit of {REPO} ({done.stderr.strip()})")
    return done.stdout.strip()


def run_side(tree: Path, out: Path, drain_orders: int) -> dict[str, Any]:
    """One ``shop_cpu`` run of the code in ``tree``; its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    args = [sys.executable, "-m", "benchmarks.shop_cpu", "--out", str(out), "--drain-orders", str(drain_orders)]
    with open(out.with_suffix(".log"), "wb") as log:
        done = subprocess.run(args, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} in {tree} failed ({done.returncode}): see {out.with_suffix('.log')}")
    result: dict[str, Any] = orjson.loads((out / "shop_e2e_cpu.json").read_bytes())
    return result


def run(base: str, pairs: int, out: Path, drain_orders: int) -> dict[str, list[dict[str, Any]]]:
    """``pairs`` runs of each side, base first, in turns; the base from a worktree removed afterwards."""
    commit = commit_of(base)
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="shop-ab-") as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], cwd=REPO, check=True)
        try:
            if not (tree / "benchmarks" / "shop_cpu.py").exists():
                raise SystemExit(f"--base {base}: too old, it has no benchmarks/shop_cpu.py")
            for pair in range(1, pairs + 1):
                for side, code in (("base", tree), ("head", REPO)):
                    result = run_side(code, out / f"{side}-{pair}", drain_orders)
                    runs[side].append(result)
                    print(f"{side} {pair}/{pairs}: {result['run']['commit']}: "
                          f"{result['steady']['cpu_ms_per_order']['total']:.2f} ms per order at the steady point, "
                          f"{result['backlog']['ended_per_s']:.0f} orders/s in the backlog; steal "
                          f"{_cell(_steal('steady')(result))} % steady, {_cell(_steal('backlog')(result))} % "
                          "backlog", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
    return runs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shop_ab", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare this checkout against")
    parser.add_argument("--pairs", type=int, default=3, help="runs of each side, in turns (default 3)")
    parser.add_argument("--drain-orders", type=int, default=6000, help="orders of each backlog drain (default 6000)")
    parser.add_argument("--out", type=Path, default=None, help="directory for every run's results and the report "
                        "(default: a new temporary directory, kept)")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.drain_orders < 1:
        parser.error("--pairs and --drain-orders must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="shop-ab-results-"))
    out.mkdir(parents=True, exist_ok=True)
    runs = run(args.base, args.pairs, out, args.drain_orders)
    text = (f"Interleaved A/B, {args.pairs} pairs: base {runs['base'][0]['run']['commit']}, head "
            f"{runs['head'][0]['run']['commit']}; medians, then each run.\n\n{table(runs)}\n")
    (out / "ab.md").write_text(text)
    print(text + f"\nEvery run's results: {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
