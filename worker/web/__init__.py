"""The HTTP side: the submission API, the dashboard, API keys, status and metrics.

Builds on the queue (it reads job records and queue depths); nothing below imports it.
"""
