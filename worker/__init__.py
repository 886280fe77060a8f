"""The gradwire worker."""
