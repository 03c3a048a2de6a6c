"""Worker naming for tests/test_distributed.py (imported by the Celery workers it starts, not a test).

Both Celery workers run on one machine, so Airflow's default hostname (the machine's FQDN) would be
the same for every task. Each worker is started with ``AIRFLOW__CORE__HOSTNAME_CALLABLE`` pointing
here and its own ``HUBSPOT_TEST_WORKER``, so the metadata database records which worker ran each
task instance.
"""

from __future__ import annotations

import os

WORKER_ENV = "HUBSPOT_TEST_WORKER"


def worker_name() -> str:
    """The name the test gave this worker process."""
    return os.environ[WORKER_ENV]
