"""Offline image tools, built on the engine."""
