"""Readers of what lies on disk, for the node kinds and the command line: ``annotations`` (COCO JSON,
JSONL and CSV manifests), ``documents`` (MMC4-style interleaved documents), ``shards`` (WebDataset
shards: pack, read), ``imagefiles`` (image checks and fingerprints), ``gallery`` (concept galleries),
``local`` (pretrained state dicts, paths relative to the graph file, sha256). No node kind here."""
