"""Storage for workloads: checkpoints and the KV-cache block store, on 3FS or any POSIX path."""
