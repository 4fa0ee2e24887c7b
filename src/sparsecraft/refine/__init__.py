"""Mask refinement without training: change which weights are kept, never how many."""
