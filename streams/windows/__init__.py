"""Windows as the flows define them: kinds and bounds, results, aggregates, per-key state."""
