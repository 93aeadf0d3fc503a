"""tallyflow operators."""
