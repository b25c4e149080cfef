"""The kopf operator: one subpackage per kind, shared Kubernetes helpers in kube.py."""
