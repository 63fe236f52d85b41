"""Building blocks of the decoder models: plain single-device layers.

Every parameter carries a `weight_loader(param, loaded_weight, shard_id=None)` attribute: the one
place that knows how a checkpoint tensor lands in the parameter. Tensor parallelism will shard
there (narrowing the checkpoint tensor to this rank's slice) without touching the model files.
"""
