"""actdata on a Ray cluster: one server per node, and the directory that lists them. The only Ray user."""
