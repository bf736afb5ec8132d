from shard_inference.cli import main

main()
