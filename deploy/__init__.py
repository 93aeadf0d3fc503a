"""tallyflow deploy."""
