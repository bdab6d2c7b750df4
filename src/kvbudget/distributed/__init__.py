"""Past one machine, on Ray: evaluation sweeps over workers (`sweep`) and serving replicas with
session affinity (`replicas`). Ray is optional (``pip install 'kvbudget[ray]'``): these modules
import it on first use, and `require_ray` says what to install where it is missing."""

from __future__ import annotations

from .cluster import connect, require_ray

__all__ = ["connect", "require_ray"]
