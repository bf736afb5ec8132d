from shard_node.cli import main

main()
