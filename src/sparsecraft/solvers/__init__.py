"""Pruners that also update the kept weights to compensate for the removed ones."""
