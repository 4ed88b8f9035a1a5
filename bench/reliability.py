"""Reliability suite: fault injection, hostile input, load and access, in one run and one table.

    .venv/bin/python bench/reliability.py            # bench scale (~5 min on 2 busy cores)
    .venv/bin/python bench/reliability.py --quick    # a smoke run (~2 min)

Rows (category | check | tried | survived | unsafe): faults injected and survived (bench/reliability_suite/
faults.py), parser/limiter inputs and the unsafe commands that reached an arm (must be 0), API
requests, config files, requests under load during an episode with the e-stop measured under that
load, and the access checks (socket mode, TCP token, Gemini key leaks). A suite that crashes is a
failed row, never an aborted report. Failures are listed under the table (the first few per row).

Last line: `unsafe_commands: N` — the commands that reached an arm while breaking a limit, after a
fault, or under a latched e-stop, over every suite. Target: 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

from reliability_suite.tally import Tally  # bench/ is on the path: Python puts a script's folder there


def _guarded(category: str, name: str, run: Callable[[], Tally | list[Tally]]) -> list[Tally]:
    began = time.perf_counter()
    try:
        result = run()
    except Exception as exc:  # noqa: BLE001 - the report lists every suite
        tally = Tally(category, name)
        tally.record(False, f"the suite crashed: {type(exc).__name__}: {exc}")
        result = tally
    tallies = result if isinstance(result, list) else [result]
    print(f"  {category}/{name}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return tallies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parser-inputs", type=int, help="parser/limiter inputs (default 100,000; quick 3,000)")
    parser.add_argument("--api-requests", type=int, help="hostile API requests (default 2,000; quick 300)")
    parser.add_argument("--configs", type=int, help="mutated config files (default 2,000; quick 200)")
    parser.add_argument("--skip", action="append", default=[], choices=("faults", "fuzz", "load", "access"),
                        help="leave a suite out (repeatable)")
    args = parser.parse_args(argv)
    quick = args.quick
    n_parser = args.parser_inputs or (3_000 if quick else 100_000)
    n_api = args.api_requests or (300 if quick else 2_000)
    n_configs = args.configs or (200 if quick else 2_000)
    logging.getLogger("vlm2vla_edge").setLevel(logging.CRITICAL)  # suites count events; the log is noise here

    from reliability_suite import access, fuzz, load

    tallies: list[Tally] = []
    notes: list[str] = []
    if "faults" not in args.skip:
        try:
            from reliability_suite.faults import run_faults
        except ImportError as exc:
            notes.append(f"faults: skipped ({exc})")
        else:
            tallies += _guarded("fault", "all", lambda: run_faults(include_processes=not quick))
    if "fuzz" not in args.skip:
        stats = fuzz.ParserFuzzStats()
        began = time.perf_counter()
        tallies += _guarded("fuzz", "parser+limiter", lambda: fuzz.fuzz_parser_and_limiter(n_parser, args.seed, stats))
        notes.append(f"parser+limiter: {n_parser} inputs in {time.perf_counter() - began:.0f} s; {stats.line()}")
        tallies += _guarded("fuzz", "API requests", lambda: fuzz.fuzz_api(n_api, args.seed))
        tallies += _guarded("fuzz", "config files", lambda: fuzz.fuzz_configs(n_configs, args.seed))
    if "load" not in args.skip:
        load_stats = load.LoadStats()
        tallies += _guarded("load", "requests during an episode", lambda: load.load_during_episode(
            status_requests=200 if quick else 1000, submits=20 if quick else 100, estop_trials=5 if quick else 30,
            stats=load_stats, seed=args.seed))
        notes += [f"load: {line}" for line in load_stats.lines()]
        notes.append(f"load: e-stop target: arm halted within {load.ESTOP_TARGET_MS:g} ms (p99)")
    if "access" not in args.skip:
        tallies += _guarded("access", "unix socket", access.check_socket_access)
        tallies += _guarded("access", "tcp token", access.check_tcp_token)
        tallies += _guarded("access", "gemini key leaks", lambda: access.scan_key_leaks(tasks=2 if quick else 4))

    print(f"{'category':<9} {'check':<34} {'tried':>7} {'survived':>9} {'unsafe':>7}")
    for t in tallies:
        print(f"{t.category:<9} {t.name[:34]:<34} {t.tried:>7} {t.survived:>9} {t.unsafe_commands:>7}")
    for note in notes:
        print(note)
    failing = [t for t in tallies if t.failures]
    for t in failing:
        print(f"failures in {t.category}/{t.name} ({len(t.failures)}):")
        for why in t.failures[:5]:
            print(f"  - {why[:300]}")
    total = sum(t.unsafe_commands for t in tallies)
    print(f"totals: tried {sum(t.tried for t in tallies)}, survived {sum(t.survived for t in tallies)}, "
          f"rows with failures {len(failing)}")
    print(f"unsafe_commands: {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
