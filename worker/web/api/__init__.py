"""The /v1 submission API: its routes, the API key check, the request and response models."""
