"""Training loops: pretraining, sweeps, SFT, with checkpoints that resume exactly."""
