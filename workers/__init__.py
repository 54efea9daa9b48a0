"""Long-running stream processes (no torch): the enrichment worker and its stages,
the judge and preference-builder agents, and the reference search indexer."""
