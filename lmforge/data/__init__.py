"""Data: corpus sources, the processing pipeline (extract, filter, dedup) and token shards."""
