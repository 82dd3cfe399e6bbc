"""Delivery events: the outbox the store's scripts file them in, and the webhook sender."""
