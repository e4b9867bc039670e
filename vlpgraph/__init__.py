"""vlpgraph: declarative experiment graphs for vision-language pre-training research."""

__version__ = "0.1.0"
