"""Model side (torch, transformers, TRL, DeepSpeed): MACE, LACU, SFT, DPO, the judge,
the paper's metrics and the tiny local model factory. Uses schemas/ only."""
