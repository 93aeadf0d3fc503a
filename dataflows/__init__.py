"""tallyflow dataflows."""
