"""Postroom: an outbound mail queue."""
