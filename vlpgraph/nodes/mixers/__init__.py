"""Node kinds: mixers."""
