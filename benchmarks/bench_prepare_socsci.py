"""`ftlab prepare-socsci` at SocSci210's full size: rows/s and peak memory on a synthetic 2.9M-row file.

    python benchmarks/bench_prepare_socsci.py                      # as in docs/BENCHMARKS.md (~3 GB of disk, temporary)
    python benchmarks/bench_prepare_socsci.py --rows 100000 --no-write   # quick look

The full dataset is not here (the hub is unreachable and ../shared/data holds the 1% split only), so the input
is generated in the hub's row shape (`sample_id`, `participant`, `demographic`, `stimuli`, `response`,
`condition_num`, `task_num`, `study_id`) from the real rows: every generated row takes the scenario, answer,
condition and demographics of one of the 6,069 val + test rows of ../shared/data/socsci210
(`ftlab.data.socsci_prepare.to_hub_row` parses them back out of the prompt), in turn. Participants answer 7
rows each (2.9M rows / 400k participants in the hub), belong to one of 210 studies and are numbered within
their study, as in the hub; each participant gets demographics of their own (values of the real rows), so that
almost no prompt repeats (the real data's duplicates and conflicts are counted on its real rows, in the tests). The hub's
`prompt` and `reasoning` columns (model outputs that prepare-socsci does not read) are left out, so a real row
is somewhat longer to parse.

Measured per file: `ftlab prepare-socsci FILE --out DIR --split SPLIT` as a fresh process (import and start-up
included), wall time, rows/s (the report's own, over the pass, and end to end), and the process's peak resident
memory (`os.wait4` rusage, ru_maxrss). Two sizes, 1/10 and all of `--rows`: memory that does not grow with the
rows is what "constant memory" means here. The files are written into a temporary directory and deleted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import write_section

from ftlab.data.socsci_prepare import to_hub_row

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "socsci210"
SECTION = "## SocSci210 at full data"


def real_rows() -> list[dict]:
    rows = []
    for name in ("val.jsonl", "test.jsonl"):
        with (REAL / name).open() as f:
            rows += [json.loads(line) for line in f]
    return rows


def demographics_of(person: int, values: dict[str, list]) -> dict:
    """A participant's demographics: the person number in mixed radix over the real rows' values (age 18-90, then
    each field's distinct values), so participants up to the product of their counts all differ."""
    demo, rest = {"age": 18 + person % 73}, person // 73
    for key, options in values.items():
        demo[key] = options[rest % len(options)]
        rest //= len(options)
    return demo


def write_synthetic(path: Path, n: int, templates: list[dict]) -> int:
    """n hub-shaped rows; returns the file's size in bytes."""
    hub = [to_hub_row(t, participant=0, sample_id=0) for t in templates]
    values = {key: sorted({str(h["demographic"][key]) for h in hub if h["demographic"][key] is not None})
              for key in ("gender", "education", "income", "employment", "ideology")}
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            person = i // 7
            row = dict(hub[i % len(hub)])
            row["demographic"] = dict(row["demographic"], **demographics_of(person, values))
            row.update(sample_id=i, participant=person // 210, study_id=f"st{person % 210:03d}")
            f.write(json.dumps(row) + "\n")
    return path.stat().st_size


def measure(path: Path, out: Path, split: str) -> dict:
    """One `ftlab prepare-socsci` process: wall time, peak RSS, and its report."""
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "ftlab.cli", "prepare-socsci", str(path), "--out", str(out),
                             "--split", split], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    stdout = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"prepare-socsci failed ({proc.returncode}):\n{stdout}")
    report = json.loads((out / "report.json").read_text())
    return {"rows": report["rows"], "split": split, "wall_s": round(wall, 1), "pass_s": report["seconds"],
            "rows_per_s_pass": report["rows_per_s"], "rows_per_s_end_to_end": round(report["rows"] / wall),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "output_bytes": sum(p.stat().st_size for p in out.iterdir()), "table": stdout.strip()}


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def section(results: list[dict], input_bytes: dict[int, int], load: tuple[str, str]) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [SECTION, "",
             (f"`python benchmarks/bench_prepare_socsci.py` ({time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} "
             f"cores, Python {platform.python_version()}): "
             "`ftlab prepare-socsci FILE --out DIR --split S` as a fresh process on synthetic files of SocSci210's "
             "hub row shape built from the 6,069 real val + test rows (how: the script's docstring). **Other jobs "
             f"shared the 2 cores** (load average {load[0]} before, {load[1]} after, 1/5/15 min), so the rates are "
             "floors, not what a quiet machine gives."), "",
             "| rows | input | split | wall | rows/s (pass) | rows/s (end to end) | CPU s | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['rows']:,} | {input_bytes[r['rows']] / 1e9:.2f} GB | {r['split']} | {r['wall_s']} s | "
                     f"{r['rows_per_s_pass']:,.0f} | {r['rows_per_s_end_to_end']:,} | {r['cpu_s']} | "
                     f"{r['peak_rss_mb']} MB |")
    full = results[-1]
    lines += ["", "The report printed by the full run:", "", "```", full["table"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2_900_000, help="rows of the full file (default 2,900,000)")
    p.add_argument("--split", default="participant", choices=("study", "condition", "participant"),
                   help="split kind (default participant: the most split keys)")
    p.add_argument("--workdir", default=None, help="where the temporary files go (default: the system temp dir)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = p.parse_args()
    if not REAL.is_dir():
        raise SystemExit(f"needs the real rows in {REAL}")
    templates = real_rows()
    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="bench-socsci-", dir=args.workdir))
    results, sizes = [], {}
    try:
        for n in (args.rows // 10, args.rows):
            path = work / f"socsci_{n}.jsonl"
            started = time.time()
            sizes[n] = write_synthetic(path, n, templates)
            print(f"{n:,} rows generated ({sizes[n] / 1e9:.2f} GB) in {time.time() - started:.0f} s", flush=True)
            r = measure(path, work / f"out_{n}", args.split)
            print(json.dumps({k: v for k, v in r.items() if k != "table"}), flush=True)
            results.append(r)
            path.unlink()
            shutil.rmtree(work / f"out_{n}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = section(results, sizes, (load_before, load_average()))
    print(text)
    if not args.no_write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", SECTION, text)


if __name__ == "__main__":
    main()
