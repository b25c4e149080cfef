"""Condition types and reasons of unit mounts, the KV-cache 3FS gate, the RDMA preflight and scaling
(CamelCase constants; the shared ones are in fireflyer.api.conditions)."""

from __future__ import annotations

# Types
KV_CACHE_READY = "KvCacheReady"

# Reasons
THREEFS_READY = "ThreeFSClusterReady"
THREEFS_NOT_FOUND = "ThreeFSClusterNotFound"
THREEFS_NOT_READY = "ThreeFSClusterNotReady"
PREFLIGHT_FAILED = "PreflightFailed"
PLACEMENT_FOUND = "PlacementFound"
NO_PLACEMENT = "NoPlacement"
UNITS_SCALED = "UnitsScaled"
SCALER_RESET = "ScalerReset"
AUTOSCALED = "Autoscaled"
