"""`fireflyer prepare`: raw JSONL/Parquet text → deduplicated, length-filtered, tokenized shards
in the trainer's `fireflyer.tokens/v1` format, on smallpond."""
