"""Loss scaling, overflow statistics and gradient clipping."""
