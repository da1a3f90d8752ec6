"""Engine layer: translation, allocation, journaling and parent chains on top of the host file."""
