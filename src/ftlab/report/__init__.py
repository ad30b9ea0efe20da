"""`ftlab report`: compare runs from their directories (curves, seed groups, tables, comparability flags)."""
