"""tallyflow state."""
