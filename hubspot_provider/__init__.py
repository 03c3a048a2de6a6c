"""Apache Airflow provider that keeps HubSpot email subscription statuses in step with consent records."""

from __future__ import annotations

__version__ = "0.1.0"
