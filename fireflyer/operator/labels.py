"""Labels and annotations the operator puts on its children."""

from __future__ import annotations

DEPLOYMENT = "fireflyer.dev/deployment"
ROLE = "fireflyer.dev/role"
UNIT = "fireflyer.dev/unit"
COMPONENT = "fireflyer.dev/component"
REVISION = "fireflyer.dev/revision"
PAIRING_REVISION = "fireflyer.dev/pairing-revision"  # prefill and decode units of one value pair
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "fireflyer"
# kopf's finalizer: only ThreeFSClusters need it now (their disks are wiped on deletion); older
# releases put it on every InferenceDeployment and TrainingJob, and reconciles take it off.
FINALIZER = "fireflyer.dev/finalizer"
PLACED_AT = "fireflyer.dev/placed-at"
PLACED_DOMAIN = "fireflyer.dev/domain"
POD_INDEX = "apps.kubernetes.io/pod-index"
TRAINING_JOB = "fireflyer.dev/training-job"
ATTEMPT = "fireflyer.dev/attempt"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# The taints the node lifecycle controller puts on a node that stops reporting or turns NotReady.
NODE_LOSS_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
