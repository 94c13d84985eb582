"""Storage: the store's shard and manifest format, its writer, replay, and a datasets-directory reader."""
