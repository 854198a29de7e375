"""How averaged gradients reach the shards: sharded (ZeRO-2) and replicated (ZeRO-1) strategies."""
