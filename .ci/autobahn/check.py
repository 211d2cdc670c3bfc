#!/usr/bin/env python3
"""Autobahn TestSuite helper for .ci/autobahn.sh (standard library only).

Two subcommands:

  check.py args  --spec SPEC --port PORT
      Print the kosoku command-line arguments (one per line) that the
      Autobahn-format spec file asks for: the server URL with {port} filled
      in, -o OUTDIR, -i for every "cases" pattern and -x for every
      "exclude-cases" pattern (plus "exclude-agent-cases" of the agent).
      kosoku 0.1.0 rejects --spec ("not implemented yet"), hence this.

  check.py check --spec SPEC [--markdown] REPORT_DIR
      Read REPORT_DIR/index.json (kosoku writes Autobahn's report layout),
      print a per-group table, the details of every failing case, and the
      closing line "N passed, M failed". Exit 1 when a case failed, when the
      report is missing or empty, when an included pattern matched no case,
      when an excluded case ran anyway, or when the caller passes --problem
      (the server died, the run timed out); each such problem counts as one
      more failure in the closing line.

A case passes when both its behavior and its closing behavior are OK,
NON-STRICT or INFORMATIONAL (the same rule as kosoku's CaseResult.passed and
Autobahn's report colours). FAILED, WRONG CODE, UNCLEAN, FAILED BY CLIENT,
UNIMPLEMENTED and ERROR (the case could not run: refused connection, crash)
all fail.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
from collections import defaultdict

PASSING = ("OK", "NON-STRICT", "INFORMATIONAL")

# Autobahn's category names (autobahntestsuite report.py / kosoku _report_assets).
GROUP_NAMES = {
    "1": "Framing",
    "2": "Pings/Pongs",
    "3": "Reserved Bits",
    "4": "Opcodes",
    "5": "Fragmentation",
    "6": "UTF-8 Handling",
    "7": "Close Handling",
    "9": "Limits/Performance",
    "10": "Misc",
    "12": "Compression (payloads)",
    "13": "Compression (parameters)",
}

# How much of an expected/received event list to print for a failing case.
MAX_EVENTS_CHARS = 600
# Details are printed for this many failing cases; all ids are listed anyway
# (a server that died mid-run fails hundreds of cases the same way).
MAX_DETAILED = 40


def case_key(case_id: str) -> list[int]:
    """Numeric order: 1.2.10 after 1.2.9."""
    return [int(p) if p.isdigit() else 0 for p in case_id.split(".")]


def load_spec(path: str, cases: str | None = None) -> dict:
    """Read an Autobahn-format spec; `cases` (space-separated patterns)
    replaces its "cases" list, for a quick local run of a few groups."""
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    if cases:
        spec["cases"] = cases.split()
    if not spec.get("cases"):
        raise SystemExit(f"{path}: 'cases' must list at least one pattern")
    servers = spec.get("servers") or []
    if len(servers) != 1 or "url" not in servers[0]:
        raise SystemExit(f"{path}: 'servers' must hold exactly one server with a 'url'")
    reasons = spec.get("exclude-reasons", {})
    for pattern in excluded_patterns(spec):
        if pattern not in reasons:
            raise SystemExit(f"{path}: excluded pattern {pattern!r} has no entry in 'exclude-reasons'")
    return spec


def excluded_patterns(spec: dict) -> list[str]:
    patterns = list(spec.get("exclude-cases", []))
    agent = spec["servers"][0].get("agent", "")
    patterns += spec.get("exclude-agent-cases", {}).get(agent, [])
    return patterns


def cmd_args(opts: argparse.Namespace) -> int:
    spec = load_spec(opts.spec, opts.cases)
    url = spec["servers"][0]["url"].replace("{port}", str(opts.port))
    out = [url, "-o", opts.outdir or spec.get("outdir", "./target/autobahn/report")]
    for pattern in spec["cases"]:
        out += ["-i", pattern]
    for pattern in excluded_patterns(spec):
        out += ["-x", pattern]
    print("\n".join(out))
    return 0


def one_line(text: object, limit: int = 400) -> str:
    """Case descriptions hold HTML line breaks; print them on one line."""
    flat = " ".join(str(text).replace("<br>", " ").replace("<br/>", " ").split())
    return flat if len(flat) <= limit else flat[: limit - 4] + " ..."


def short(value: object, limit: int = MAX_EVENTS_CHARS) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def case_passes(entry: dict) -> bool:
    return entry.get("behavior") in PASSING and entry.get("behaviorClose") in PASSING


def describe_failure(report_dir: str, case_id: str, entry: dict) -> list[str]:
    lines = [f"--- case {case_id}: behavior={entry.get('behavior')} close={entry.get('behaviorClose')}"]
    path = os.path.join(report_dir, entry.get("reportfile", ""))
    try:
        with open(path, encoding="utf-8") as f:
            detail = json.load(f)
    except (OSError, ValueError) as err:
        lines.append(f"    (no detail report: {err})")
        return lines
    lines += [
        f"    description : {one_line(detail.get('description'))}",
        f"    expectation : {one_line(detail.get('expectation'))}",
        f"    result      : {detail.get('result')}",
        f"    result close: {detail.get('resultClose')}",
        f"    expected    : {short(detail.get('expected'))}",
        f"    received    : {short(detail.get('received'))}",
        f"    exp. close  : {short(detail.get('expectedClose'))}",
        "    close       : remote code={} reason={!r}; local code={}; closedByMe={} "
        "failedByMe={} droppedByMe={} wasClean={} notCleanReason={!r}".format(
            detail.get("remoteCloseCode"),
            detail.get("remoteCloseReason"),
            detail.get("localCloseCode"),
            detail.get("closedByMe"),
            detail.get("failedByMe"),
            detail.get("droppedByMe"),
            detail.get("wasClean"),
            detail.get("wasNotCleanReason"),
        ),
        f"    duration    : {detail.get('duration')} ms   detail: {path}",
    ]
    return lines


def cmd_check(opts: argparse.Namespace) -> int:
    spec = load_spec(opts.spec, opts.cases)
    index_path = os.path.join(opts.report_dir, "index.json")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as err:
        print(f"autobahn: cannot read report {index_path}: {err}")
        for problem in opts.problem:
            print(f"autobahn: {problem}")
        print(f"0 passed, {1 + len(opts.problem)} failed")
        return 1

    problems: list[str] = list(opts.problem)
    # Normally one agent (the server's Server header, else its address);
    # cases that could not connect are filed under the address instead.
    results: dict[str, dict] = {}
    for agent_results in index.values():
        results.update(agent_results)
    if not results:
        problems.append("the report holds no case results")

    for pattern in spec["cases"]:
        if not any(fnmatch.fnmatchcase(c, pattern) for c in results):
            problems.append(f"included pattern {pattern!r} matched no case in the report")
    for pattern in excluded_patterns(spec):
        ran = sorted((c for c in results if fnmatch.fnmatchcase(c, pattern)), key=case_key)
        if ran:
            problems.append(f"excluded pattern {pattern!r} ran anyway: {', '.join(ran)}")

    # Per-group counts, one column per verdict seen (behavior, then close).
    groups: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    durations: dict[str, int] = defaultdict(int)
    failing: list[str] = []
    for case_id in sorted(results, key=case_key):
        entry = results[case_id]
        group = case_id.split(".")[0]
        counts = groups[group]
        counts["cases"] += 1
        durations[group] += int(entry.get("duration") or 0)
        if case_passes(entry):
            counts["passed"] += 1
            counts[entry["behavior"]] += 1
        else:
            counts["failed"] += 1
            failing.append(case_id)

    columns = ["cases", "OK", "NON-STRICT", "INFORMATIONAL", "failed"]
    rows = []
    for group in sorted(groups, key=lambda g: int(g) if g.isdigit() else 0):
        c = groups[group]
        rows.append(
            [group, GROUP_NAMES.get(group, "?")]
            + [str(c.get(col, 0)) for col in columns]
            + [f"{durations[group] / 1000:.1f}"]
        )
    total = [sum(groups[g].get(col, 0) for g in groups) for col in columns]
    rows.append(["all", ""] + [str(n) for n in total] + [f"{sum(durations.values()) / 1000:.1f}"])
    header = ["group", "name"] + columns + ["time s"]

    if opts.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        fmt = lambda r: "  ".join(  # noqa: E731
            v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))
        )
        print(fmt(header))
        print(fmt(["-" * w for w in widths]))
        for row in rows[:-1]:
            print(fmt(row))
        print(fmt(["-" * w for w in widths]))
        print(fmt(rows[-1]))

    excluded = excluded_patterns(spec)
    if excluded:
        reasons = spec.get("exclude-reasons", {})
        print("\nexcluded by the spec:")
        for pattern in excluded:
            print(f"  {pattern}: {reasons.get(pattern, '')}")

    if failing:
        print(f"\nfailing cases ({len(failing)}): {' '.join(failing)}")
        for case_id in failing[:MAX_DETAILED]:
            print("\n".join(describe_failure(opts.report_dir, case_id, results[case_id])))
        if len(failing) > MAX_DETAILED:
            print(f"... details of {len(failing) - MAX_DETAILED} more in {opts.report_dir}/index.html")
    for problem in problems:
        print(f"autobahn: {problem}")

    passed = sum(1 for e in results.values() if case_passes(e))
    failed = len(failing) + len(problems)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p_args = sub.add_parser("args", help="print kosoku arguments for a spec file")
    p_args.add_argument("--spec", required=True)
    p_args.add_argument("--port", required=True, type=int)
    p_args.add_argument("--cases", help="space-separated patterns replacing the spec's cases")
    p_args.add_argument("--outdir", help="override the spec's outdir")
    p_args.set_defaults(func=cmd_args)

    p_check = sub.add_parser("check", help="summarise a kosoku report and gate on it")
    p_check.add_argument("--spec", required=True)
    p_check.add_argument("--cases", help="space-separated patterns replacing the spec's cases")
    p_check.add_argument("--markdown", action="store_true", help="print the group table as Markdown")
    p_check.add_argument(
        "--problem", action="append", default=[], metavar="TEXT",
        help="a run-level failure found by the caller (server died, timeout); counts as failed",
    )
    p_check.add_argument("report_dir")
    p_check.set_defaults(func=cmd_check)

    opts = parser.parse_args(argv)
    return opts.func(opts)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
