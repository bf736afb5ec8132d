from shard_tool.cli import main

main()
