"""Turn a pytest-benchmark JSON (from the benchmarks/ suite) into ratio tables.

    python benchmarks/report.py BENCH.json [--out results/CARD-DATE.json] [--md table.md]

Per group (one size or shape), each variant's per-call time (us), its speed-up over
the authors-style reference ('authors') and over fptt_fast's readable reference
('reference' or 'fused_reference'), and for update benchmarks the bandwidth at
44 B/param and its fraction of the copy bandwidth measured in the same run.
"""
import argparse
import json
import sys
from collections import defaultdict


def summarise(raw):
    meta = raw.get("fptt", {})
    copy_gbps = meta.get("copy_GBps") or 0.0
    groups = defaultdict(dict)
    for b in raw["benchmarks"]:
        info = b["extra_info"]
        groups[info["group"]][info["variant"]] = info
    rows = []
    for group in sorted(groups):
        variants = groups[group]
        base = variants.get("authors", {}).get("us_per_call")
        ref = (variants.get("reference") or variants.get("fused_reference") or {}).get("us_per_call")
        for name, info in sorted(variants.items(), key=lambda kv: kv[1]["us_per_call"]):
            us = info["us_per_call"]
            row = {"group": group, "variant": name, "us_per_call": round(us, 2),
                   "speedup_vs_authors": round(base / us, 2) if base else None,
                   "speedup_vs_reference": round(ref / us, 2) if ref else None}
            if "bytes_per_call" in info:
                gbps = info["bytes_per_call"] / us / 1e3
                row["GBps_at_44B"] = round(gbps, 1)
                row["fraction_of_copy_bw"] = round(gbps / copy_gbps, 3) if copy_gbps else None
            rows.append(row)
    return {"device": meta.get("device"), "torch": meta.get("torch"), "quick": meta.get("quick"),
            "copy_GBps": round(copy_gbps, 1), "threads": meta.get("threads"),
            "datetime": raw.get("datetime"), "rows": rows}


def markdown(summary):
    lines = [f"device: {summary['device']}, torch {summary['torch']}, {summary['threads']} CPU "
             f"thread(s), copy bandwidth "
             f"{summary['copy_GBps']} GB/s (read+write), measured {summary['datetime']}"
             + (" (quick mode)" if summary["quick"] else ""), "",
             "| group | variant | us/call | x authors | x reference | GB/s @44B | of copy BW |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else str(v)  # noqa: E731
    for r in summary["rows"]:
        lines.append(f"| {r['group']} | {r['variant']} | {r['us_per_call']} | "
                     f"{fmt(r['speedup_vs_authors'])} | {fmt(r['speedup_vs_reference'])} | "
                     f"{fmt(r.get('GBps_at_44B'))} | {fmt(r.get('fraction_of_copy_bw'))} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench_json")
    ap.add_argument("--out", help="write the summary JSON here")
    ap.add_argument("--md", help="write the markdown table here")
    a = ap.parse_args(argv)
    with open(a.bench_json) as f:
        summary = summarise(json.load(f))
    if not summary["rows"]:
        print("no benchmark rows in", a.bench_json, file=sys.stderr)
        return 1
    table = markdown(summary)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
