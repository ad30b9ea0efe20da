"""Launching a recipe beyond one process: named profiles (profiles/*.yaml) run through torchrun or
`accelerate launch` (ftlab.launch.launcher)."""
