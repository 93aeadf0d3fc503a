"""tallyflow deploy: the top layer, the CLI, tools and dev stand-ins; no package imports it."""
