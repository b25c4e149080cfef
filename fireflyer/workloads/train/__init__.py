"""The trainer: `fireflyer train` (see docs/training.md)."""
