"""Training: the loop shared by SFT and preference optimisation (``Objective``), settings,
masked-loss SFT (eqs. 3, 4), the preference losses (eqs. 5, 6 and others), tree and turn
packing, the reference log-prob cache, checkpoints with exact resume, and FSDP2."""
