"""Node kinds: decoders (decoder.caption)."""
