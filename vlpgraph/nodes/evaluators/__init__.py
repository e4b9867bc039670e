"""Node kinds: evaluators."""
