"""Ablation and activation patching of candidate heads against control heads."""
