"""Operators DAG authors use to keep HubSpot subscription statuses in step."""

from __future__ import annotations

from hubspot_provider.operators.hubspot import HubSpotWriteStatusesOperator

__all__ = ["HubSpotWriteStatusesOperator"]
