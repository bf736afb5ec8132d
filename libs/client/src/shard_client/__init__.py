"""AI Shard's Python inference client: tritonclient's API with the shard's routing."""
