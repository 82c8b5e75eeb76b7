"""Archipelago: a Kubernetes operator that plans heterogeneous GPU fleets for LLM inference.

Layers (observe -> decide -> act):

* ``archipelago.api``      -- pydantic models of the CRDs (single source of truth for ``crds/``).
* ``archipelago.decide``   -- pure code: catalogues, performance model, simulator, planner.
                              Imports neither kopf nor kubernetes (import-linter contract).
* ``archipelago.observe``  -- cluster and Prometheus snapshots.
* ``archipelago.act``      -- pure manifest builders and server-side apply.
* ``archipelago.controller`` -- kopf handlers wiring the three together.
"""

__version__ = "0.1.0"
