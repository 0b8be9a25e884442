"""Prefect flows: they compose the tasks of tasks/ and hold no heavy logic themselves."""
