"""Postroom's end-to-end throughput bench (``make bench``); see ``run.py``."""
