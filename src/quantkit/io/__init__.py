"""Model sources in and checkpoints out."""
