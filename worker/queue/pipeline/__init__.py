"""The pipeline: ready jobs taken in groups, one attempt each, delivered through a transport."""
