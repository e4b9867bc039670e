"""From a graph file to trials, knowing no method: ``spec`` (the YAML's shape, every error with its
line), ``registry`` (node kinds by name), ``ports`` (the types along edges), ``graph`` (nodes bound to
kinds, validated, hashed), ``sweep`` (an experiment's trials and their identity), ``compile`` (one
trial built into a plan), ``catalog`` (the node catalog as Markdown). See docs/architecture.md."""
