"""The gradwire parameter server."""
