"""Node kinds: datasets."""
