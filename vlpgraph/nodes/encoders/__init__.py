"""Node kinds: encoders."""
