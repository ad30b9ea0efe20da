"""Models: loading (embedded, hub, local, scratch), adapters, memory estimates, the architecture's names."""
