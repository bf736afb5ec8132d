from shard_registry.cli import main

main()
