"""tallyflow sinks."""
