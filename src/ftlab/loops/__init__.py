"""Iterative loops built from the one training loop and the generation engine: `oak` (SOKRATES's OaK loop:
sample -> verify -> prefer -> DPO), with resumable stage directories (`stages`)."""
