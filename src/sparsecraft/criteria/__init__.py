"""Importance scores that choose a mask without changing the kept weights."""
