"""3FS: configuration rendering, chain tables, admin command plans (pure, no I/O)."""
