"""KneeNet: the paper's two-headed network, its blocks and its two-rate optimizer."""
