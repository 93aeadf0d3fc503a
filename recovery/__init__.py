"""tallyflow recovery."""
