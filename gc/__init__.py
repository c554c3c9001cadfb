"""gc room."""
