"""One-command demo: sync a generated day of consent events into a local HubSpot emulator with Airflow.

What it does, all under ``.demo/`` in the repository (wiped first, git-ignored):

1. seeds a SQLite consent table with a realistic day of events (``demo/seed.py``);
2. starts the HubSpot emulator as a subprocess, with HubSpot's 10 requests/s in a compressed rolling
   window and 2% random 5xx answers;
3. points Airflow at both through ``AIRFLOW_CONN_*`` environment variables, migrates an embedded
   SQLite metadata DB in a throwaway ``AIRFLOW_HOME``;
4. runs ``airflow dags test hubspot_consent_sync <day + 1>``, which covers ``<day>``;
5. prints what happened, from the run's ``summary.json``.

The emulator is stopped whatever happens. The exit code is non-zero when the DAG run failed.
Run it through ``./bin/demo``, which builds the environment first.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import seed  # noqa: E402 - demo/ is a folder of scripts, not a package

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / ".demo"
DAG_ID = "hubspot_consent_sync"
# HubSpot's 100 requests per 10 s, in a window compressed to one second so that pacing matters.
EMULATOR_ARGS = [
    "--rate-limit-max", "10", "--rate-limit-interval-ms", "1000", "--fault-rate-5xx", "0.02", "--seed", "1",
]
TOKEN = "pat-emulator-token"  # the emulator's default; a local stand-in, not a HubSpot credential
# A run that never finishes must still end the demo, with the emulator stopped.
DAG_TEST_TIMEOUT_S = 600


def _step(message: str) -> float:
    print(f"==> {message}", flush=True)
    return time.monotonic()


def _airflow_env(port: int, source_db: Path) -> dict[str, str]:
    # The user's own Airflow settings must not leak into the demo, nor the demo's into theirs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({
        "AIRFLOW_HOME": str(DEMO / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        # `dags test` would sit out the 5-minute retry delay of a failed task; fail fast instead.
        "AIRFLOW__HUBSPOT__TASK_RETRIES": "0",
        "AIRFLOW_CONN_HUBSPOT_DEFAULT": json.dumps({
            "conn_type": "hubspot", "host": f"http://127.0.0.1:{port}", "password": TOKEN,
        }),
        "AIRFLOW_CONN_HUBSPOT_CONSENT_SOURCE": json.dumps({"conn_type": "sqlite", "host": str(source_db)}),
    })
    return env


def _start_emulator(log_path: Path) -> tuple[subprocess.Popen, int]:
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "hubspot_provider.testing.emulator", *EMULATOR_ARGS],
        stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT,
    )
    ready, _, _ = select.select([process.stdout], [], [], 30)
    line = process.stdout.readline() if ready else ""
    prefix = "HubSpot emulator listening on http://127.0.0.1:"
    if not line.startswith(prefix):
        process.kill()
        raise RuntimeError(f"the emulator did not start (see {log_path}): {line.strip()!r}")
    return process, int(line.strip().removeprefix(prefix))


def _stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        # `airflow dags test` does not always end on SIGTERM.
        process.kill()
        process.wait()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Turn SIGTERM into an exception so that the finally blocks stop the emulator and Airflow.
    raise SystemExit(128 + signum)


def _airflow(
    args: list[str], env: dict[str, str], log_path: Path, timeout_s: float = DAG_TEST_TIMEOUT_S
) -> int:
    with log_path.open("a") as log:
        log.write(f"\n$ airflow {' '.join(args)}\n")
        log.flush()
        process = subprocess.Popen([sys.executable, "-m", "airflow", *args], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.write(f"\n(demo) airflow {args[0]} did not finish within {timeout_s:.0f}s; stopped\n")
            return -1
        finally:
            _stop(process)


def _latest_summary(storage: Path) -> dict | None:
    summaries = sorted(storage.glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(summaries[-1].read_text()) if summaries else None


def _relative(uri: str | None) -> str:
    if not uri:
        return "-"
    path = uri.removeprefix("file://")
    return os.path.relpath(path, ROOT) if path.startswith(str(ROOT)) else uri


def _print_summary(summary: dict, source_events: int) -> None:
    categories = ", ".join(f"{name} {count}" for name, count in summary["failed_by_category"].items())
    dead = summary.get("dead_letters", 0)
    branch = "summarise_dead_letters (alert in its task log)" if summary["failed"] else "report"
    rows = [
        ("Data interval", f"[{summary['data_interval_start']}, {summary['data_interval_end']})"),
        ("Events read", f"{summary['rows_read']} rows (the table has {source_events}): "
                        f"{summary['events_in_interval']} in the interval, "
                        f"{summary['outside_interval']} outside it"),
        ("Unplaceable rows", f"{summary['unplaceable']} whose occurred_at fits no day (listed by every run, in "
                             f"no day's failure ratio): {_relative(summary.get('unplaceable_uri'))}"
                             if summary.get("unplaceable") else "none"),
        ("Latest per key", f"{summary['staged']} statuses ({summary['superseded']} older events superseded; "
                           f"{summary['superseded_later']} keys left to a later event), "
                           f"{summary['valid']} valid"),
        ("Written to HubSpot", f"{summary['succeeded']}: {summary['changed']} changed, "
                               f"{summary['unchanged']} already in that state"),
        ("Failed", f"{summary['failed']} ({categories})" if categories else "none"),
        ("Withheld", f"{summary['withheld']}: a newer change made in HubSpot wins ({summary.get('hubspot_changes')})"
                     if summary.get("withheld") else f"none ({summary.get('hubspot_changes')}: no newer opt-out "
                     "made in HubSpot)"),
        ("Dead letters", f"{dead} in {_relative(summary.get('dead_letter_uri'))}" if dead else "none"),
        ("Ledger", f"{summary.get('ledger_records', 0)} audit records (one per status sent, with HubSpot's "
                   f"answer) in {_relative(summary.get('ledger_uri'))}"),
        ("HubSpot traffic", f"{summary['requests']} write requests, {summary.get('reads', 0)} reads of current "
                            f"statuses, {summary['retries']} retried, "
                            f"{summary['rate_limited']} rate-limited; "
                            f"{summary['records_per_s']:.0f} records/s"),
        ("Outcome branch", branch),
        ("Run files", _relative(summary.get("run_uri"))),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print()


def main() -> int:
    """Run the demo; returns the process exit code."""
    parser = argparse.ArgumentParser(description="Consent sync demo against the local HubSpot emulator.")
    parser.add_argument("--day", type=date.fromisoformat, default=date(2026, 3, 10), help="UTC day to sync")
    parser.add_argument("--contacts", type=int, default=1500, help="contacts in the generated consent table")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    if DEMO.exists():
        shutil.rmtree(DEMO)
    DEMO.mkdir()
    airflow_log = DEMO / "airflow.log"
    source_db = DEMO / "consent.db"
    logical_date = (args.day + timedelta(days=1)).isoformat()

    started = _step(f"seeding {_relative(str(source_db))} with a day of consent events ({args.day}, UTC)")
    counts = seed.seed(source_db, args.day, contacts=args.contacts)
    print(f"    {counts['events']} events for {counts['keys']} contact/subscription pairs, with typos, "
          "unknown subscriptions, bad timestamps and events of the neighbouring days")

    emulator = None
    try:
        _step("starting the HubSpot emulator (10 requests/s rolling limit, 2% random 5xx)")
        emulator, port = _start_emulator(DEMO / "emulator.log")
        print(f"    listening on http://127.0.0.1:{port}")
        env = _airflow_env(port, source_db)

        began = _step(f"airflow db migrate (throwaway AIRFLOW_HOME {_relative(env['AIRFLOW_HOME'])})")
        if _airflow(["db", "migrate"], env, airflow_log) != 0:
            print(f"airflow db migrate failed; see {_relative(str(airflow_log))}", file=sys.stderr)
            return 1
        print(f"    done in {time.monotonic() - began:.1f}s")

        began = _step(f"airflow dags test {DAG_ID} {logical_date}   (covers {args.day})")
        code = _airflow(["dags", "test", DAG_ID, logical_date], env, airflow_log)
        state = "success" if code == 0 else "FAILED"
        elapsed = time.monotonic() - began
        print(f"    DAG run {state} in {elapsed:.1f}s; full log: {_relative(str(airflow_log))}")
    finally:
        _stop(emulator)

    summary = _latest_summary(DEMO / "airflow" / "hubspot_consent")
    if summary is not None:
        _print_summary(summary, counts["events"])
    if code != 0:
        tail = airflow_log.read_text(errors="replace").splitlines()[-40:]
        print("Last lines of the Airflow log:", *tail, sep="\n    ", file=sys.stderr)
        print(f"\nThe DAG run failed (exit code {code}).", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    print(f"Demo finished in {elapsed:.0f}s; the emulator is stopped, nothing is left running.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
