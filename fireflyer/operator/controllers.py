"""Every per-kind controller. Importing this module registers their kopf handlers."""
