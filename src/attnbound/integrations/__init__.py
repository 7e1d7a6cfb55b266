"""Bridges from attnbound to other libraries (optional extras)."""
