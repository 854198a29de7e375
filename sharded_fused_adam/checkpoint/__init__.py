"""Gathered and sharded checkpoints, their files, lock and reader, and offline conversion."""
