"""Training: data packing, losses, the sharded trainer, and the pretrain / SFT / DPO command lines."""
