"""Write generated consent records to HubSpot through HubSpotHook, against the local emulator.

    python examples/write_statuses.py            # 5,000 records, a few bad ones, some HubSpot faults

Shows the hook on its own (no DAG): validation, batching, pacing under a compressed rate limit,
retries through injected faults, per-item errors, and the report.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="hubspot-example-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")

from hubspot_provider.hooks.hubspot import HubSpotHook  # noqa: E402
from hubspot_provider.testing import HubSpotEmulator  # noqa: E402


def generate(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    states = ["SUBSCRIBED", "UNSUBSCRIBED", "NOT_SPECIFIED"]
    out = []
    for i in range(n):
        record = {
            "subscriberIdString": f"person{rng.randrange(n)}@example{i % 40}.com",
            "subscriptionId": rng.choice([1001, 1002, 1003]),
            "statusState": rng.choice(states),
            "legalBasis": "CONSENT_WITH_NOTICE",
            "legalBasisExplanation": "Preference centre",
        }
        roll = rng.random()
        if roll < 0.005:
            record["subscriberIdString"] = "not-an-email"
        elif roll < 0.01:
            record["subscriptionId"] = 999_000 + i  # unknown to the portal
        elif roll < 0.012:
            record["statusState"] = "opted_in"
        out.append(record)
    return out


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    with HubSpotEmulator(rate_limit_max=20, rate_limit_interval_ms=1000, fault_rate_5xx=0.03,
                         fault_rate_drop_after_write=0.01, seed=1) as emulator:
        os.environ["AIRFLOW_CONN_HUBSPOT_DEFAULT"] = emulator.airflow_connection("hubspot_default")
        hook = HubSpotHook("hubspot_default")
        report = hook.write_statuses(generate(n), batch_size=100)
    print(f"HubSpot emulator at {emulator.url}: rate limit 20 requests / 1 s, 3% 5xx, 1% dropped connections")
    print(report.summary())
    print(f"  changed: {report.changed}, unchanged: {report.reasons.get('NO_STATUS_CHANGE', 0)}")
    print(f"  records/s: {report.submitted / max(report.elapsed_s, 1e-9):.0f}")
    print("  failed by category:", json.dumps(report.failed_by_category))
    for failure in report.failed[:5]:
        print(f"    input #{failure.index}: {failure.category}: {failure.message[:110]}")
    ok = report.succeeded + report.superseded + report.failed_count == report.submitted
    print("  every input accounted for:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
