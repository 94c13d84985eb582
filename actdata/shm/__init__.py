"""The buffer in shared memory: slots and their states, sampling, segment files and their space."""
