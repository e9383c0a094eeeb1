"""Workers hold a model (or a shard of it) on each rank: loading, FSDP2 sharding, generation,
rewards and the RL actor/critic maths. Nothing here imports `trainer`."""
