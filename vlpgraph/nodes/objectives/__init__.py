"""Node kinds: objectives."""
