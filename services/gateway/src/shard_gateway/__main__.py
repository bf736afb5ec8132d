from shard_gateway.cli import main

main()
