"""fusefs room."""
