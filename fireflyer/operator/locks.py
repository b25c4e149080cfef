"""Locks shared by controllers."""

from __future__ import annotations

import threading

PLACEMENT = threading.RLock()
"""Held by every reconcile that plans GPU placement (inference units, training jobs): two plans
made at once could pick the same free nodes."""
