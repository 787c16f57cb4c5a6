"""Checking a build: recomputing every number (verify), comparing with a published revision, explaining a number's provenance."""
