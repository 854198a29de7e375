"""Shard math, flat buffers, per-rank bucket state and its storage (no collectives)."""
