"""Checkpoints: their sources (hub, local folder, demo generation), manifests and the preflight check."""
