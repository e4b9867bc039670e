"""Node kinds: heads."""
